#!/usr/bin/env node
// ruxo-fhir test FHIR server: Medplum's FHIR router + in-memory repository behind an HTTP front
// with switches for auth, SMART Backend Services, Bulk Data export and fault injection.
// Usage: node server.mjs [--port 0] [--host 127.0.0.1] [--config '{"page_size": 25}']
//        [--exit-on-stdin-close]
// Prints one JSON line {"event": "listening", "port": N, ...} on stdout when ready.  With
// --exit-on-stdin-close it exits when its stdin closes (so it never outlives the test process).
// Logs requests to stderr when RUXO_FHIR_SERVER_LOG=1.  See README.md.
import http from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { BulkExports } from './bulk.mjs';
import { FAULT_KINDS, defaultConfig, mergeConfig } from './config.mjs';
import { FHIR_JSON, FhirEngine, loadDefinitions, outcome } from './fhir.mjs';
import { SmartAuth, safeEqual, smartConfiguration } from './smart.mjs';

const MAX_BODY = 200 * 1024 * 1024;
const LOG = ['1', 'true', 'yes'].includes(String(process.env.RUXO_FHIR_SERVER_LOG ?? '').toLowerCase());

function parseArgs(argv) {
  const out = { port: 0, host: '127.0.0.1', config: undefined, watchStdin: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--port') out.port = Number(val());
    else if (a === '--host') out.host = val();
    else if (a === '--config') out.config = JSON.parse(val());
    else if (a === '--exit-on-stdin-close') out.watchStdin = true;
    else throw new Error(`unknown argument ${a}`);
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
loadDefinitions();

let startupPatch = args.config ?? {};
let config = mergeConfig(defaultConfig(), startupPatch);
const getConfig = () => config;
const engine = new FhirEngine(getConfig);
const smart = new SmartAuth();
const bulk = new BulkExports();
let stats;
let faultCounters;

function zeroFaults() {
  return Object.fromEntries(FAULT_KINDS.map((k) => [k, 0]));
}

function resetStats() {
  stats = {
    requests: 0,
    by_method: {},
    by_status: {},
    reads: 0,
    writes: 0,
    entries_written: 0,
    write_entries_received: 0,
    faults_injected: zeroFaults(),
    faults_injected_reads: zeroFaults(),
    tokens_issued: 0,
    exports_started: 0,
  };
  faultCounters = { writes: 0, reads: 0 };
}
resetStats();

function resetAll() {
  config = mergeConfig(defaultConfig(), startupPatch);
  engine.reset();
  smart.clear();
  bulk.clear();
  resetStats();
}

// Every repository access runs through this queue: requests are serialized, so a transaction's
// snapshot/restore never interleaves with another request.
let queue = Promise.resolve();
function serialized(fn) {
  const run = queue.then(fn);
  queue = run.catch(() => undefined);
  return run;
}

function log(...parts) {
  if (LOG) process.stderr.write(`[fhir-server] ${parts.join(' ')}\n`);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(new Error('body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, { status, headers = {}, body, raw }) {
  const h = { ...headers };
  let payload = '';
  if (raw !== undefined) {
    payload = raw;
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    if (!Object.keys(h).some((k) => k.toLowerCase() === 'content-type')) h['Content-Type'] = FHIR_JSON;
  }
  h['Content-Length'] = Buffer.byteLength(payload);
  res.writeHead(status, h);
  res.end(payload);
  stats.by_status[status] = (stats.by_status[status] ?? 0) + 1;
}

const WRITE_METHODS = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);

/** Write entries a request carries (what a client sent, landed or not): 1, or a Bundle's writes. */
function writeEntries(segs, bodyText) {
  if (segs.length > 0) return 1;
  try {
    const bundle = JSON.parse(bodyText);
    return (bundle?.entry ?? []).filter((e) => WRITE_METHODS.has(String(e?.request?.method ?? '').toUpperCase())).length;
  } catch {
    return 0;
  }
}

/** A Bundle POSTed to the base whose entries are all GET/HEAD: searches and reads, no write. */
function readBundle(segs, bodyText) {
  if (segs.length > 0) return false;
  try {
    const entries = JSON.parse(bodyText)?.entry ?? [];
    return entries.length > 0 && entries.every((e) => ['GET', 'HEAD'].includes(String(e?.request?.method ?? '').toUpperCase()));
  } catch {
    return false;
  }
}

function authRequired() {
  return Boolean(config.require_token || config.basic_auth || config.require_auth);
}

/** @returns {undefined|object} undefined when authorised, else the 401 response */
function checkAuth(req) {
  if (!authRequired()) return undefined;
  const h = String(req.headers.authorization ?? '');
  let expired = false;
  const bearer = /^Bearer\s+(\S+)\s*$/i.exec(h);
  if (bearer) {
    const token = bearer[1];
    if (config.require_token && safeEqual(token, config.require_token)) return undefined;
    if (smart.isValidToken(token)) return undefined;
    expired = true;
  }
  const basic = /^Basic\s+(\S+)\s*$/i.exec(h);
  if (basic && config.basic_auth) {
    const decoded = Buffer.from(basic[1], 'base64').toString('utf8');
    const sep = decoded.indexOf(':');
    if (
      sep >= 0 &&
      safeEqual(decoded.slice(0, sep), config.basic_auth.user) &&
      safeEqual(decoded.slice(sep + 1), config.basic_auth.password)
    ) {
      return undefined;
    }
  }
  const r = outcome(
    401,
    'login',
    h ? 'The credentials are invalid or the access token has expired' : 'Authentication required'
  );
  const challenges = [expired ? 'Bearer realm="ruxo-fhir-test", error="invalid_token"' : 'Bearer realm="ruxo-fhir-test"'];
  if (config.basic_auth) challenges.push('Basic realm="ruxo-fhir-test"');
  r.headers = { 'WWW-Authenticate': challenges };
  return r;
}

function pickFault(kind) {
  const f = kind === 'writes' ? config.faults : config.faults_reads;
  const n = ++faultCounters[kind];
  for (const k of FAULT_KINDS) {
    if (f[k] > 0 && n % f[k] === 0) return k;
  }
  return undefined;
}

function drop(req, res) {
  stats.by_status.dropped = (stats.by_status.dropped ?? 0) + 1;
  res.socket?.destroy();
  req.socket?.destroy();
}

async function handleAdmin(req, res, path) {
  const body = await readBody(req);
  if (path === '/$admin/reset' && req.method === 'POST') {
    await serialized(() => resetAll());
    return send(res, { status: 200, headers: { 'Content-Type': 'application/json' }, body: { status: 'reset', config } });
  }
  if (path === '/$admin/config' && req.method === 'POST') {
    let patch;
    try {
      patch = body ? JSON.parse(body) : {};
      const next = mergeConfig(config, patch);
      if ('faults' in patch) faultCounters.writes = 0;
      if ('faults_reads' in patch) faultCounters.reads = 0;
      config = next;
    } catch (err) {
      return send(res, { status: 400, headers: { 'Content-Type': 'application/json' }, body: { error: err.message } });
    }
    return send(res, { status: 200, headers: { 'Content-Type': 'application/json' }, body: config });
  }
  if (path === '/$admin/config' && req.method === 'GET') {
    return send(res, { status: 200, headers: { 'Content-Type': 'application/json' }, body: config });
  }
  if (path === '/$admin/stats' && req.method === 'GET') {
    stats.entries_written = engine.repo.entriesWritten;
    return send(res, { status: 200, headers: { 'Content-Type': 'application/json' }, body: stats });
  }
  if (path === '/$admin/count' && req.method === 'GET') {
    return send(res, { status: 200, headers: { 'Content-Type': 'application/json' }, body: engine.repo.counts() });
  }
  return send(res, { status: 404, headers: { 'Content-Type': 'application/json' }, body: { error: `no admin route ${req.method} ${path}` } });
}

async function handle(req, res) {
  const host = req.headers.host ?? `${args.host}:${server.address().port}`;
  const root = `http://${host}`;
  const base = `${root}/fhir`;
  const url = new URL(req.url, root);
  let path;
  try {
    path = decodeURIComponent(url.pathname);
  } catch {
    path = url.pathname;
  }
  if (path.startsWith('/$admin/')) return handleAdmin(req, res, path);

  stats.requests++;
  stats.by_method[req.method] = (stats.by_method[req.method] ?? 0) + 1;
  const bodyText = await readBody(req);
  const method = req.method;

  if ((path === '/fhir/metadata' || path === '/metadata') && method === 'GET') {
    return send(res, {
      status: 200,
      body: engine.capabilityStatement(config, root, { authRequired: authRequired(), smart: config.smart_clients.length > 0 }),
    });
  }
  if ((path === '/fhir/.well-known/smart-configuration' || path === '/.well-known/smart-configuration') && method === 'GET') {
    return send(res, { status: 200, headers: { 'Content-Type': 'application/json' }, body: smartConfiguration(root) });
  }
  if (path === '/auth/token') {
    if (method !== 'POST') return send(res, { status: 405, headers: { Allow: 'POST' }, body: { error: 'invalid_request' } });
    const ct = String(req.headers['content-type'] ?? '');
    if (!ct.startsWith('application/x-www-form-urlencoded')) {
      return send(res, {
        status: 400,
        headers: { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' },
        body: { error: 'invalid_request', error_description: 'use application/x-www-form-urlencoded' },
      });
    }
    const form = Object.fromEntries(new URLSearchParams(bodyText));
    const r = smart.issue(form, `${root}/auth/token`, config);
    if (r.status === 200) stats.tokens_issued++;
    return send(res, { status: r.status, headers: { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' }, body: r.body });
  }

  const bulkStatus = /^\/bulkstatus\/([^/]+)$/.exec(path);
  const bulkFile = /^\/bulkfiles\/([^/]+)\/([^/]+)$/.exec(path);
  if (bulkStatus || bulkFile) {
    const denied = checkAuth(req);
    if (denied) return send(res, denied);
    if (bulkStatus && method === 'GET') return send(res, bulk.status(bulkStatus[1]));
    if (bulkStatus && method === 'DELETE') return send(res, bulk.cancel(bulkStatus[1]));
    if (bulkFile && method === 'GET') return send(res, bulk.file(bulkFile[1], bulkFile[2]));
    return send(res, outcome(405, 'not-supported', `${method} not allowed here`));
  }

  if (path !== '/fhir' && !path.startsWith('/fhir/')) {
    return send(res, outcome(404, 'not-found', `Nothing at ${path}; the FHIR base is ${base}`));
  }

  // ---- FHIR base ----
  const denied = checkAuth(req);
  if (denied) return send(res, denied);
  if (config.latency_ms > 0) await sleep(config.latency_ms);

  const isWrite = method === 'POST' || method === 'PUT' || method === 'DELETE' || method === 'PATCH';
  const segs = path.slice('/fhir'.length).split('/').filter(Boolean);
  const isSearchPost = method === 'POST' && segs.length === 2 && segs[1] === '_search';
  // a batch of GET entries (push's reads before writing) is a read, whatever its method
  const countAsWrite = isWrite && !isSearchPost && !(method === 'POST' && readBundle(segs, bodyText));
  if (countAsWrite) {
    stats.writes++;
    stats.write_entries_received += writeEntries(segs, bodyText);
  } else {
    stats.reads++;
  }
  const fault = pickFault(countAsWrite ? 'writes' : 'reads');
  if (fault) {
    (countAsWrite ? stats.faults_injected : stats.faults_injected_reads)[fault]++;
    log('fault', fault, method, req.url);
    if (fault === '429') {
      return send(res, {
        ...outcome(429, 'throttled', 'Too many requests (injected fault)'),
        headers: { 'Retry-After': String(config.retry_after) },
      });
    }
    if (fault === '503') {
      return send(res, outcome(503, 'transient', 'Service unavailable (injected fault)'));
    }
    if (fault === 'drop_before') return drop(req, res);
  }

  let result;
  if (segs.length === 1 && segs[0] === '$export') {
    if (config.capabilities_omit.includes('export')) {
      result = outcome(400, 'not-supported', '$export is not supported by this server');
    } else if (method !== 'GET') {
      result = outcome(405, 'not-supported', 'Only GET [base]/$export is supported');
    } else {
      result = await serialized(() =>
        bulk.kickoff({
          repo: engine.repo,
          query: url.searchParams,
          headers: req.headers,
          root,
          requestUrl: `${root}${req.url}`,
          cfg: config,
          requiresAccessToken: authRequired(),
        })
      );
      if (result.status === 202) stats.exports_started++;
    }
  } else {
    result = await serialized(() =>
      engine.handle({
        method,
        segs,
        query: url.searchParams,
        rawQuery: url.search.replace(/^\?/, ''),
        headers: req.headers,
        bodyText,
        base,
      })
    );
  }
  if (fault === 'drop_after') return drop(req, res);
  return send(res, result);
}

const server = http.createServer((req, res) => {
  const t0 = Date.now();
  res.on('finish', () => log(req.method, req.url, res.statusCode, `${Date.now() - t0}ms`));
  handle(req, res).catch((err) => {
    log('error', err?.stack ?? String(err));
    if (!res.headersSent && !res.destroyed) {
      send(res, outcome(500, 'exception', `Internal error: ${err?.message ?? err}`));
    }
  });
});
server.keepAliveTimeout = 30_000;

server.listen(args.port, args.host, () => {
  const { port } = server.address();
  const root = `http://${args.host}:${port}`;
  process.stdout.write(`${JSON.stringify({ event: 'listening', port, root, base: `${root}/fhir` })}\n`);
});

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
if (args.watchStdin) {
  // Exit when the parent closes our stdin (or dies), so the server never outlives the tests.
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);


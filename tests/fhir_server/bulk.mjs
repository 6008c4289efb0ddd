// Bulk Data Access IG v2: system-level $export kick-off, status polling, manifest, ndjson files.
import { randomUUID } from 'node:crypto';
import { isResourceType } from '@medplum/core';
import { outcome } from './fhir.mjs';

const OUTPUT_FORMATS = ['application/fhir+ndjson', 'application/ndjson', 'ndjson'];
const KNOWN_PARAMS = new Set(['_type', '_since', '_outputFormat']);
const FHIR_INSTANT = /^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2}))?)?)?$/;

export class BulkExports {
  constructor() {
    this.jobs = new Map();
  }

  clear() {
    this.jobs.clear();
  }

  /**
   * Handles GET [base]/$export.
   * @param {object} a - {repo, query: URLSearchParams, headers, root, requestUrl, cfg, requiresAccessToken}
   * @returns {{status:number, headers?:object, body?:object}} The response.
   */
  kickoff({ repo, query, headers, root, requestUrl, cfg, requiresAccessToken }) {
    const prefer = String(headers.prefer ?? '');
    if (!/respond-async/i.test(prefer)) {
      return outcome(400, 'invalid', '$export requires the header Prefer: respond-async');
    }
    const accept = String(headers.accept ?? 'application/fhir+json');
    if (!/application\/fhir\+json|application\/json|\*\/\*/i.test(accept)) {
      return outcome(400, 'not-supported', `$export: Accept must be application/fhir+json, got ${accept}`);
    }
    const lenient = /handling\s*=\s*lenient/i.test(prefer);
    for (const k of query.keys()) {
      if (!KNOWN_PARAMS.has(k) && !lenient) {
        return outcome(400, 'not-supported', `$export parameter ${k} is not supported by this server`, k);
      }
    }
    const fmt = query.get('_outputFormat');
    if (fmt && !OUTPUT_FORMATS.includes(fmt)) {
      return outcome(400, 'not-supported', `_outputFormat ${fmt} is not supported; use application/fhir+ndjson`, '_outputFormat');
    }
    let types;
    const typeParam = query.getAll('_type').join(',');
    if (typeParam) {
      types = [...new Set(typeParam.split(',').map((s) => s.trim()).filter(Boolean))];
      const bad = types.filter((t) => !isResourceType(t));
      if (bad.length) return outcome(400, 'invalid', `_type has unknown resource type(s): ${bad.join(', ')}`, '_type');
    } else {
      types = repo.types();
    }
    let since;
    const sinceParam = query.get('_since');
    if (sinceParam) {
      since = Date.parse(sinceParam);
      if (!FHIR_INSTANT.test(sinceParam) || Number.isNaN(since)) {
        return outcome(400, 'invalid', `_since is not a FHIR instant: ${sinceParam}`, '_since');
      }
    }
    const id = randomUUID();
    const transactionTime = new Date().toISOString();
    const files = new Map();
    const output = [];
    for (const type of types) {
      const lines = repo
        .current(type)
        .filter((r) => since === undefined || Date.parse(r.meta?.lastUpdated ?? 0) >= since)
        .map((r) => JSON.stringify(r));
      if (!lines.length) continue;
      const per = cfg.bulk_max_lines > 0 ? cfg.bulk_max_lines : lines.length;
      for (let i = 0, part = 1; i < lines.length; i += per, part++) {
        const chunk = lines.slice(i, i + per);
        const name = `${type}-${part}.ndjson`;
        files.set(name, chunk.join('\n') + '\n');
        output.push({ type, url: `${root}/bulkfiles/${id}/${name}`, count: chunk.length });
      }
    }
    this.jobs.set(id, {
      polls: 0,
      pollsBeforeDone: cfg.bulk_polls,
      retryAfter: cfg.bulk_retry_after,
      files,
      manifest: { transactionTime, request: requestUrl, requiresAccessToken, output, error: [] },
    });
    return {
      status: 202,
      headers: { 'Content-Location': `${root}/bulkstatus/${id}` },
      body: {
        resourceType: 'OperationOutcome',
        issue: [{ severity: 'information', code: 'informational', diagnostics: `Export ${id} accepted` }],
      },
    };
  }

  status(id) {
    const job = this.jobs.get(id);
    if (!job) return outcome(404, 'not-found', `No export job ${id}`);
    job.polls++;
    if (job.polls <= job.pollsBeforeDone) {
      return {
        status: 202,
        headers: {
          'Retry-After': String(job.retryAfter),
          'X-Progress': `in progress (poll ${job.polls} of ${job.pollsBeforeDone})`,
        },
        body: undefined,
      };
    }
    return { status: 200, headers: { 'Content-Type': 'application/json; charset=utf-8' }, body: job.manifest };
  }

  cancel(id) {
    if (!this.jobs.delete(id)) return outcome(404, 'not-found', `No export job ${id}`);
    return {
      status: 202,
      body: { resourceType: 'OperationOutcome', issue: [{ severity: 'information', code: 'informational', diagnostics: `Export ${id} cancelled` }] },
    };
  }

  file(id, name) {
    const data = this.jobs.get(id)?.files.get(name);
    if (data === undefined) return outcome(404, 'not-found', `No export file ${id}/${name}`);
    return { status: 200, headers: { 'Content-Type': 'application/fhir+ndjson' }, raw: data };
  }
}

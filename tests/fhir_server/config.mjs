// Run-time switches of the test FHIR server.  Every switch is documented in README.md.
// POST /$admin/config merges JSON into the current config (RFC 7386 style: nested objects are
// merged, `null` puts a switch back to its default).  POST /$admin/reset restores the defaults.

export const FAULT_KINDS = ['429', '503', 'drop_before', 'drop_after'];

export function defaultConfig() {
  return {
    fhir_version: '4.0.1',
    // Resource types listed in the CapabilityStatement (the server accepts every R4 type).
    resource_types: ['Patient', 'Condition', 'MedicationStatement', 'Observation', 'AdverseEvent'],
    // Strings removed from the CapabilityStatement and refused by the server (see README).
    capabilities_omit: [],
    // "refuse": a request that needs an omitted capability gets 400 not-supported.
    // "ignore": If-None-Exist and omitted search parameters are silently dropped, like a
    //           server that does not know them (conditional update, transaction and $export
    //           are always refused).
    omitted_behavior: 'refuse',
    batch_only: false,
    page_size: 50,
    // "offset": live offset paging, readable next links; "cached": HAPI-like, the result set is
    // taken at the first page and later pages come from opaque `<base>?_getpages=<id>&...` links
    paging: 'offset',
    page_overlap: 0, // next page starts this many entries early (pages overlap), as live paging can
    max_bundle_entries: 0, // 0 = no cap
    strict_search: true, // unknown search parameters -> 400 (HAPI's default); false = ignored
    validate: true, // validateResource() from @medplum/core on every create/update
    // HAPI-style: "Type/id" references must exist on write; referenced resources cannot be deleted
    referential_integrity: false,
    keep_noop_updates: true, // PUT with unchanged content keeps the current version
    version_ids: 'uuid', // "uuid" (Medplum native) or "serial" ("1", "2", ... like HAPI)
    adverse_event_identifier: true, // custom AdverseEvent?identifier= search parameter
    medplum_transaction_limits: false, // Medplum's caps: <=50 updates, <=8 entries if conditional
    // EHR-like: client-assigned ids refused (HAPI's ClientIdStrategy NOT_ALLOWED, Epic): a PUT
    // that would create Type/id -> 404 as HAPI answers; the statement says updateCreate false
    no_client_ids: false,
    // false: batch/transaction-response entries carry only `response` (no `resource`), as servers
    // that answer with status + location only; the written version is then in no reply at all
    bundle_entry_resource: true,
    // Auth
    require_token: null, // static bearer token accepted on /fhir
    basic_auth: null, // {"user": ..., "password": ...}
    require_auth: false, // require some credential even without require_token/basic_auth
    smart_clients: [], // [{"client_id": ..., "jwks": {"keys": [...]}, "scope"?: "system/*.read ..."}]
    token_lifetime: 5, // seconds
    // Faults: every Nth write (POST/PUT/PATCH/DELETE to /fhir) / read (GET to /fhir).
    faults: { 429: 0, 503: 0, drop_before: 0, drop_after: 0 },
    faults_reads: { 429: 0, 503: 0, drop_before: 0, drop_after: 0 },
    retry_after: 1, // seconds, on 429
    latency_ms: 0, // added before every /fhir request
    // Bulk Data $export
    bulk_polls: 2, // status polls answered 202 before the manifest
    bulk_retry_after: 1,
    bulk_max_lines: 0, // split an output file after N lines; 0 = one file per type
  };
}

const TYPES = {
  fhir_version: 'string',
  resource_types: 'string[]',
  capabilities_omit: 'string[]',
  omitted_behavior: ['refuse', 'ignore'],
  batch_only: 'boolean',
  page_size: 'posint',
  paging: ['offset', 'cached'],
  page_overlap: 'int',
  max_bundle_entries: 'int',
  strict_search: 'boolean',
  validate: 'boolean',
  referential_integrity: 'boolean',
  keep_noop_updates: 'boolean',
  bundle_entry_resource: 'boolean',
  version_ids: ['uuid', 'serial'],
  adverse_event_identifier: 'boolean',
  medplum_transaction_limits: 'boolean',
  no_client_ids: 'boolean',
  require_token: 'string?',
  basic_auth: 'object?',
  require_auth: 'boolean',
  smart_clients: 'array',
  token_lifetime: 'number',
  faults: 'faults',
  faults_reads: 'faults',
  retry_after: 'int',
  latency_ms: 'int',
  bulk_polls: 'int',
  bulk_retry_after: 'int',
  bulk_max_lines: 'int',
};

function isPlainObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function check(key, value) {
  const t = TYPES[key];
  const bad = (what) => {
    throw new Error(`config ${key}: expected ${what}, got ${JSON.stringify(value)}`);
  };
  if (Array.isArray(t)) {
    if (!t.includes(value)) bad(t.join(' | '));
  } else if (t === 'string') {
    if (typeof value !== 'string') bad('a string');
  } else if (t === 'string?') {
    if (value !== null && typeof value !== 'string') bad('a string or null');
  } else if (t === 'string[]') {
    if (!Array.isArray(value) || value.some((s) => typeof s !== 'string')) bad('a list of strings');
  } else if (t === 'boolean') {
    if (typeof value !== 'boolean') bad('true or false');
  } else if (t === 'int') {
    if (!Number.isInteger(value) || value < 0) bad('an integer >= 0');
  } else if (t === 'posint') {
    if (!Number.isInteger(value) || value < 1) bad('an integer >= 1');
  } else if (t === 'number') {
    if (typeof value !== 'number' || !(value > 0)) bad('a number > 0');
  } else if (t === 'object?') {
    if (value !== null && !isPlainObject(value)) bad('an object or null');
    if (key === 'basic_auth' && value && (typeof value.user !== 'string' || typeof value.password !== 'string')) {
      bad('{"user": str, "password": str}');
    }
  } else if (t === 'array') {
    if (!Array.isArray(value)) bad('a list');
    for (const c of value) {
      if (!isPlainObject(c) || typeof c.client_id !== 'string' || !isPlainObject(c.jwks) || !Array.isArray(c.jwks.keys)) {
        bad('[{"client_id": str, "jwks": {"keys": [...]}}]');
      }
    }
  } else if (t === 'faults') {
    if (!isPlainObject(value)) bad('an object');
    for (const [k, n] of Object.entries(value)) {
      if (!FAULT_KINDS.includes(k)) bad(`keys among ${FAULT_KINDS.join(', ')}`);
      if (!Number.isInteger(n) || n < 0) bad('integers >= 0');
    }
  }
}

/**
 * Merges a patch into a config and returns a new, checked config.
 * @param {object} current - The current config.
 * @param {object} patch - JSON merge patch.
 * @returns {object} The new config.
 */
export function mergeConfig(current, patch) {
  if (!isPlainObject(patch)) {
    throw new Error('config body must be a JSON object');
  }
  const defaults = defaultConfig();
  const next = structuredClone(current);
  for (const [key, value] of Object.entries(patch)) {
    if (!(key in defaults)) {
      throw new Error(`unknown config switch: ${key}`);
    }
    if (value === null && TYPES[key] !== 'string?' && TYPES[key] !== 'object?') {
      next[key] = structuredClone(defaults[key]);
      continue;
    }
    if (TYPES[key] === 'faults' && isPlainObject(value)) {
      const merged = { ...next[key] };
      for (const [k, n] of Object.entries(value)) {
        merged[k] = n === null ? 0 : n;
      }
      check(key, merged);
      next[key] = merged;
      continue;
    }
    check(key, value);
    next[key] = structuredClone(value);
  }
  return next;
}

// SMART Backend Services (client_credentials + private_key_jwt) token endpoint and token store.
// Uses only Node's built-in crypto.
import { createPublicKey, randomBytes, timingSafeEqual, verify } from 'node:crypto';

export const ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
export const SIGNING_ALGS = ['RS384', 'ES384'];
const MAX_EXP_AHEAD_S = 300;

class TokenError extends Error {
  constructor(error, description) {
    super(description);
    this.error = error;
  }
}

function b64urlJson(part, what) {
  try {
    return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
  } catch {
    throw new TokenError('invalid_client', `client_assertion ${what} is not base64url JSON`);
  }
}

function keyMatchesAlg(jwk, alg) {
  if (jwk.alg && jwk.alg !== alg) return false;
  if (alg === 'RS384') return jwk.kty === 'RSA';
  if (alg === 'ES384') return jwk.kty === 'EC' && jwk.crv === 'P-384';
  return false;
}

export function smartConfiguration(root) {
  return {
    issuer: root,
    token_endpoint: `${root}/auth/token`,
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: SIGNING_ALGS,
    grant_types_supported: ['client_credentials'],
    scopes_supported: ['system/*.read', 'system/*.rs', 'system/*.*', 'system/*.cruds'],
    response_types_supported: ['token'],
    capabilities: ['client-confidential-asymmetric'],
  };
}

export class SmartAuth {
  constructor() {
    this.clear();
  }

  clear() {
    this.tokens = new Map(); // access_token -> {client_id, scope, expiresAt (ms)}
    this.seenJti = new Set(); // "client_id\u0000jti"
  }

  /**
   * Checks a bearer token issued by this server.
   * @param {string} token - The bearer token.
   * @returns {boolean} True when issued here and not expired.
   */
  isValidToken(token) {
    const t = this.tokens.get(token);
    if (!t) return false;
    if (Date.now() >= t.expiresAt) {
      this.tokens.delete(token);
      return false;
    }
    return true;
  }

  /**
   * Handles POST /auth/token.
   * @param {Record<string,string>} form - The decoded form body.
   * @param {string} tokenUrl - The exact token endpoint URL (the required `aud`).
   * @param {object} config - The server config.
   * @returns {{status: number, body: object}} The response.
   */
  issue(form, tokenUrl, config) {
    try {
      return { status: 200, body: this.#issue(form, tokenUrl, config) };
    } catch (err) {
      if (err instanceof TokenError) {
        return { status: 400, body: { error: err.error, error_description: err.message } };
      }
      throw err;
    }
  }

  #issue(form, tokenUrl, config) {
    if (form.grant_type !== 'client_credentials') {
      throw new TokenError('unsupported_grant_type', `grant_type must be client_credentials, got ${form.grant_type ?? '(none)'}`);
    }
    if (form.client_assertion_type !== ASSERTION_TYPE) {
      throw new TokenError('invalid_client', `client_assertion_type must be ${ASSERTION_TYPE}`);
    }
    const assertion = form.client_assertion;
    if (!assertion) {
      throw new TokenError('invalid_client', 'client_assertion is missing');
    }
    const parts = assertion.split('.');
    if (parts.length !== 3) {
      throw new TokenError('invalid_client', 'client_assertion is not a compact JWS');
    }
    const header = b64urlJson(parts[0], 'header');
    const claims = b64urlJson(parts[1], 'payload');
    if (!SIGNING_ALGS.includes(header.alg)) {
      throw new TokenError('invalid_client', `alg ${header.alg} not allowed; use ${SIGNING_ALGS.join(' or ')}`);
    }
    if (!header.kid) {
      throw new TokenError('invalid_client', 'JWT header has no kid');
    }
    const clientId = claims.iss;
    const client = (config.smart_clients ?? []).find((c) => c.client_id === clientId);
    if (!client) {
      throw new TokenError('invalid_client', `unknown client ${clientId}`);
    }
    if (claims.sub !== clientId) {
      throw new TokenError('invalid_client', 'sub must equal iss (the client_id)');
    }
    if (form.client_id !== undefined && form.client_id !== clientId) {
      throw new TokenError('invalid_client', 'client_id does not match the assertion');
    }
    const aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (aud.length !== 1 || aud[0] !== tokenUrl) {
      throw new TokenError('invalid_client', `aud must be the token endpoint ${tokenUrl}`);
    }
    const now = Date.now() / 1000;
    if (typeof claims.exp !== 'number') {
      throw new TokenError('invalid_client', 'exp is missing');
    }
    if (claims.exp <= now) {
      throw new TokenError('invalid_client', 'client_assertion has expired');
    }
    if (claims.exp > now + MAX_EXP_AHEAD_S) {
      throw new TokenError('invalid_client', 'exp is more than 5 minutes in the future');
    }
    if (!claims.jti || typeof claims.jti !== 'string') {
      throw new TokenError('invalid_client', 'jti is missing');
    }
    const jwk = client.jwks.keys.find((k) => k.kid === header.kid);
    if (!jwk) {
      throw new TokenError('invalid_client', `no key with kid ${header.kid} for client ${clientId}`);
    }
    if (!keyMatchesAlg(jwk, header.alg)) {
      throw new TokenError('invalid_client', `key ${header.kid} cannot verify ${header.alg}`);
    }
    let ok = false;
    try {
      const key = createPublicKey({ key: jwk, format: 'jwk' });
      const data = Buffer.from(`${parts[0]}.${parts[1]}`);
      const sig = Buffer.from(parts[2], 'base64url');
      ok =
        header.alg === 'RS384'
          ? verify('sha384', data, key, sig)
          : verify('sha384', data, { key, dsaEncoding: 'ieee-p1363' }, sig);
    } catch {
      ok = false;
    }
    if (!ok) {
      throw new TokenError('invalid_client', 'client_assertion signature does not verify');
    }
    const jtiKey = `${clientId}\u0000${claims.jti}`;
    if (this.seenJti.has(jtiKey)) {
      throw new TokenError('invalid_client', 'jti has already been used (replay)');
    }
    this.seenJti.add(jtiKey);

    const requested = (form.scope ?? '').split(/\s+/).filter(Boolean);
    if (requested.length === 0) {
      throw new TokenError('invalid_scope', 'scope is required');
    }
    const bad = requested.filter((s) => !/^system\/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|[cruds]+)$/.test(s));
    if (bad.length) {
      throw new TokenError('invalid_scope', `unsupported scope(s): ${bad.join(' ')}`);
    }
    let granted = requested;
    if (typeof client.scope === 'string') {
      const allowed = client.scope.split(/\s+/);
      granted = requested.filter((s) => allowed.includes(s));
      if (granted.length === 0) {
        throw new TokenError('invalid_scope', 'none of the requested scopes is allowed for this client');
      }
    }
    const lifetime = config.token_lifetime;
    const accessToken = randomBytes(24).toString('base64url');
    this.tokens.set(accessToken, {
      client_id: clientId,
      scope: granted.join(' '),
      expiresAt: Date.now() + lifetime * 1000,
    });
    return { access_token: accessToken, token_type: 'bearer', expires_in: Math.ceil(lifetime), scope: granted.join(' ') };
  }
}

export function safeEqual(a, b) {
  const x = Buffer.from(String(a));
  const y = Buffer.from(String(b));
  return x.length === y.length && timingSafeEqual(x, y);
}

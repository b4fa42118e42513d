// Emulated SaaS OAuth 2.0 providers for tokenkeeper's integration tests.
//
//   node tests/providers/emulator.mjs --family <name> [--access-ttl 6] [--grace 0]
//        [--client-id client-1] [--client-secret secret-1] [--verbose]
//
// Listens on 127.0.0.1 (a free port), prints ONE line {"port": <n>} to stdout
// and nothing else there (diagnostics go to stderr). Exits on SIGTERM/SIGINT
// and when stdin closes, so keep its stdin a pipe you hold open.
//
// Each family sends the bodies, status codes, content types and rotation
// behaviour documented in /work/shared/reference/providers.md (tables A–E);
// every family cites the rows it follows. Where the reference says "unknown"
// the emulator still has to answer something: those answers are marked
// NOT IN REFERENCE below and listed in README.md.
//
// Node 20, ES module, no npm dependencies.
import http from 'node:http';
import https from 'node:https';
import fs from 'node:fs';
import crypto from 'node:crypto';
import { URL, URLSearchParams } from 'node:url';

// ---------------------------------------------------------------- arguments

const FAMILY_NAMES = ['hubspot', 'slack', 'github', 'microsoft', 'salesforce', 'google', 'dropbox', 'xero'];
const USAGE = `usage: node emulator.mjs --family <${FAMILY_NAMES.join('|')}> [--access-ttl 6] [--grace 0] `
  + '[--client-id client-1] [--client-secret secret-1] [--verbose]';

function die(message) {
  process.stderr.write(`emulator: ${message}\n${USAGE}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { family: null, accessTtl: 6, grace: 0, clientId: 'client-1', clientSecret: 'secret-1', verbose: false,
    tlsCert: null, tlsKey: null, tlsAddress: null };
  const number = (name, value, min) => {
    const n = Number(value);
    if (value === '' || !Number.isFinite(n) || n < min) die(`${name} needs a number >= ${min}, got ${JSON.stringify(value)}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let inline;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) { inline = arg.slice(eq + 1); arg = arg.slice(0, eq); }
    const value = () => {
      if (inline !== undefined) return inline;
      if (i + 1 >= argv.length) die(`missing value for ${arg}`);
      return argv[++i];
    };
    switch (arg) {
      case '--family': opts.family = value(); break;
      case '--access-ttl': opts.accessTtl = number(arg, value(), 0.001); break;
      case '--grace': opts.grace = number(arg, value(), 0); break;
      case '--client-id': opts.clientId = value(); break;
      case '--client-secret': opts.clientSecret = value(); break;
      case '--verbose': opts.verbose = true; break;
      // Also serve HTTPS at host:port with this certificate, so that a
      // browser told to resolve the provider's own host name here (for a
      // per-customer host such as acme.my.salesforce.com) reaches us.
      case '--tls-cert': opts.tlsCert = value(); break;
      case '--tls-key': opts.tlsKey = value(); break;
      case '--tls-address': opts.tlsAddress = value(); break;
      case '-h': case '--help': process.stderr.write(`${USAGE}\n`); process.exit(0); break;
      default: die(`unknown argument ${arg}`);
    }
  }
  if (!FAMILY_NAMES.includes(opts.family)) die(`--family must be one of ${FAMILY_NAMES.join(', ')}`);
  return opts;
}

const OPTS = parseArgs(process.argv.slice(2));
const TTL = OPTS.accessTtl; // seconds; also what expires_in says
const CLIENT_ID = OPTS.clientId;
const CODE_TTL_MS = 10 * 60 * 1000;

// ---------------------------------------------------------------- state

const state = {
  clientSecret: OPTS.clientSecret,
  grants: new Map(), // id -> {id, clientId, scope, alive, ats:Set, rts:Set}
  rts: new Map(), // refresh token -> {grantId, revoked, deadAt (ms or null)}
  ats: new Map(), // access token -> {grantId, exp (ms), revoked}
  codes: new Map(), // code -> {clientId, redirectUri, challenge, method, scope, query, issueRt, exp, used}
};
const stats = {
  tokenRequests: 0,
  refreshes: 0,
  codeExchanges: 0,
  authorizeRequests: [],
  revocations: [],
  clientAuth: [],
  accepts: [],
  secretsSeen: new Set(),
};

const seen = (value) => { if (typeof value === 'string' && value !== '') stats.secretsSeen.add(value); };
const rnd = (bytes) => crypto.randomBytes(bytes).toString('base64url');
const alnum = (n) => {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
  let out = '';
  for (const b of crypto.randomBytes(n)) out += alphabet[b % alphabet.length];
  return out;
};
const hasScope = (scope, wanted) => typeof scope === 'string' && scope.split(/[\s,]+/).includes(wanted);

function newGrant(clientId, scope) {
  const grant = { id: crypto.randomUUID(), clientId, scope: scope ?? '', alive: true, ats: new Set(), rts: new Set() };
  state.grants.set(grant.id, grant);
  return grant;
}
function issueAt(grant) {
  const token = FAMILY.tokens.at();
  state.ats.set(token, { grantId: grant.id, exp: Date.now() + TTL * 1000, revoked: false });
  grant.ats.add(token);
  seen(token);
  return token;
}
function issueRt(grant) {
  const token = FAMILY.tokens.rt();
  state.rts.set(token, { grantId: grant.id, revoked: false, deadAt: null });
  grant.rts.add(token);
  seen(token);
  return token;
}
function killGrant(grant) {
  grant.alive = false;
  for (const t of grant.rts) state.rts.get(t).revoked = true;
  for (const t of grant.ats) state.ats.get(t).revoked = true;
}
/** 'valid' | 'expired' | 'revoked' | 'unknown', and the grant. */
function atStatus(token) {
  const entry = token ? state.ats.get(token) : undefined;
  if (!entry) return { status: 'unknown' };
  const grant = state.grants.get(entry.grantId);
  if (entry.revoked || !grant.alive) return { status: 'revoked', grant, entry };
  if (Date.now() >= entry.exp) return { status: 'expired', grant, entry };
  return { status: 'valid', grant, entry };
}
function rtStatus(token) {
  const entry = token ? state.rts.get(token) : undefined;
  if (!entry) return { status: 'unknown' };
  const grant = state.grants.get(entry.grantId);
  if (entry.revoked || !grant.alive) return { status: 'revoked', grant, entry };
  if (entry.deadAt !== null && Date.now() >= entry.deadAt) return { status: 'expired', grant, entry };
  return { status: 'valid', grant, entry };
}
const liveGrantFor = (clientId) => [...state.grants.values()].some((g) => g.alive && g.clientId === clientId);

// ---------------------------------------------------------------- HTTP helpers

const JSON_CT = 'application/json; charset=utf-8';
const FORM_CT = 'application/x-www-form-urlencoded; charset=utf-8';

function send(res, status, body, type = JSON_CT, headers = {}) {
  const buf = Buffer.from(body ?? '', 'utf8');
  const h = { 'Cache-Control': 'no-store', Pragma: 'no-cache', ...headers, 'Content-Length': buf.length };
  if (type) h['Content-Type'] = type;
  res.writeHead(status, h);
  res.end(buf);
}
const json = (res, status, value, headers) => send(res, status, JSON.stringify(value), JSON_CT, headers);
// URLSearchParams encodes ' ' as '+' and '/' as '%2F', exactly as GitHub does
// (Table D: `...client_id+and%2For+client_secret+passed...`).
const form = (obj) => new URLSearchParams(Object.entries(obj).map(([k, v]) => [k, String(v)])).toString();

function bearerOf(req) {
  const m = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
  return m ? m[1] : undefined;
}
function basicOf(req) {
  const m = /^Basic\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
  if (!m) return undefined;
  const decoded = Buffer.from(m[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  const unescape = (s) => { try { return decodeURIComponent(s.replace(/\+/g, ' ')); } catch { return s; } };
  if (colon < 0) return { id: unescape(decoded), secret: undefined };
  return { id: unescape(decoded.slice(0, colon)), secret: unescape(decoded.slice(colon + 1)) };
}
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > 1 << 20) { reject(new Error('body over 1 MiB')); req.destroy(); return; }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}
const formParams = (body) => Object.fromEntries(new URLSearchParams(body));

// GitHub answers form-encoded unless Accept contains application/json
// (Table D "GitHub"; Table E / quirk group 5).
function github(req, res, obj) {
  if ((req.headers.accept ?? '').toLowerCase().includes('application/json')) json(res, 200, obj);
  else send(res, 200, form(obj), FORM_CT);
}

// Microsoft error envelope (Table D "Microsoft": AADSTS number inside
// error_description plus error_codes, timestamp, trace_id, correlation_id, error_uri).
function microsoftError(res, status, error, code, text) {
  const traceId = crypto.randomUUID();
  const correlationId = crypto.randomUUID();
  const timestamp = new Date().toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  json(res, status, {
    error,
    error_description: `AADSTS${code}: ${text} Trace ID: ${traceId} Correlation ID: ${correlationId} Timestamp: ${timestamp}`,
    error_codes: [code],
    timestamp,
    trace_id: traceId,
    correlation_id: correlationId,
    error_uri: `https://login.microsoftonline.com/error?code=${code}`,
  });
}

// ---------------------------------------------------------------- families
//
// Each family:
//   tokenPath(p)            the token endpoint
//   authorizeAliases        the provider's own authorize path (GET /authorize always works)
//   authMethods             accepted client authentication at the token endpoint
//   implicitCodeGrant       code exchange without grant_type (Slack, GitHub)
//   redirectUriOptional     code exchange may omit redirect_uri (checked when sent)
//   issueRtOnCode(query)    does the code exchange return an RT (decided at /authorize)
//   rotation                'none' | 'revoke-old' | 'revoke-old-and-at' | 'keep-old' | 'grace'
//   success / deadRt / badCode / wrongSecret / unknownClient / badAuthMethod / unsupportedGrant
//   meError(status)         body of a 401 from GET /me
//   routes                  extra endpoints (revocation, introspection)

const FAMILIES = {
  // HubSpot.
  //  Table A "HubSpot": token URL /oauth/v1/token; client auth post (body), v1 also
  //    accepted query parameters; legacy revocation HTTP DELETE
  //    /oauth/v1/refresh-tokens/{token} -> 204, access tokens already issued stay valid.
  //  Table B "HubSpot": RT always; not rotated (community live test (c)); expires_in present.
  //  Table C "HubSpot": hub_id in the response.
  //  Table D "HubSpot": the older body with no `error` field:
  //    {"status":"BAD_REFRESH_TOKEN","message":"missing or invalid refresh token"};
  //    wrong secret: status BAD_CLIENT_SECRET (c).
  //  Table E: token_type lowercase `bearer`.
  hubspot: {
    tokenPath: (p) => p === '/oauth/v1/token',
    authorizeAliases: ['/oauth/authorize'],
    authMethods: ['post'],
    queryParamsToo: true,
    tokens: { at: () => `CJ${rnd(60)}`, rt: () => `na1-${crypto.randomUUID()}`, code: () => crypto.randomUUID() },
    issueRtOnCode: () => true,
    rotation: 'none',
    success: (req, res, { at, rt }) =>
      json(res, 200, { token_type: 'bearer', refresh_token: rt, access_token: at, expires_in: TTL, hub_id: 123 }),
    deadRt: (req, res) => json(res, 400, { status: 'BAD_REFRESH_TOKEN', message: 'missing or invalid refresh token' }),
    // NOT IN REFERENCE: message wording of BAD_CLIENT_SECRET / BAD_CLIENT_ID, and BAD_AUTH_CODE / BAD_GRANT_TYPE.
    wrongSecret: (req, res) => json(res, 400, { status: 'BAD_CLIENT_SECRET', message: 'missing or invalid client secret' }),
    unknownClient: (req, res) => json(res, 400, { status: 'BAD_CLIENT_ID', message: 'missing or invalid client id' }),
    badCode: (req, res) => json(res, 400, { status: 'BAD_AUTH_CODE', message: 'missing or unknown auth code' }),
    unsupportedGrant: (req, res) => json(res, 400, { status: 'BAD_GRANT_TYPE', message: 'missing or unknown grant type' }),
    routes: [{
      method: 'DELETE',
      match: (p) => /^\/oauth\/v1\/refresh-tokens\/([^/]+)$/.exec(p)?.[1],
      handle: (req, res, token) => {
        token = decodeURIComponent(token);
        recordRevocation(req, token, 'refresh_token');
        const rt = rtStatus(token);
        if (rt.status !== 'valid') return FAMILY.deadRt(req, res); // NOT IN REFERENCE: answer for an unknown token
        rt.entry.revoked = true; // only the RT dies; issued ATs stay valid (Table A)
        send(res, 204, '', null);
      },
    }],
  },

  // Slack.
  //  Table A "Slack": token URL /api/oauth.v2.access; revocation auth.revoke (Web API
  //    method, not RFC 7009); client auth basic recommended, body accepted.
  //  Table B "Slack": with token rotation expires_in present; the old RT is revoked.
  //  Table C "Slack": team.id, bot_user_id.
  //  Table D "Slack": HTTP 200 {"ok":false,"error":"invalid_refresh_token"};
  //    bad_client_secret and invalid_client_id in the same ok:false envelope; API: token_revoked.
  //  Table E: token_type `bot`; comma-separated scopes.
  slack: {
    tokenPath: (p) => p === '/api/oauth.v2.access',
    authorizeAliases: ['/oauth/v2/authorize'],
    authMethods: ['basic', 'post'],
    implicitCodeGrant: true,
    redirectUriOptional: true,
    tokens: { at: () => `xoxe.xoxb-1-${alnum(140)}`, rt: () => `xoxe-1-${alnum(140)}`, code: () => `1.${alnum(40)}` },
    issueRtOnCode: () => true,
    rotation: 'revoke-old',
    success: (req, res, { at, rt, grant }) => json(res, 200, {
      ok: true,
      access_token: at,
      token_type: 'bot',
      scope: grant.scope || 'channels:read,users:read',
      refresh_token: rt,
      expires_in: TTL,
      team: { id: 'T1', name: 'Acme' },
      bot_user_id: 'U1',
    }),
    deadRt: (req, res) => json(res, 200, { ok: false, error: 'invalid_refresh_token' }),
    wrongSecret: (req, res) => json(res, 200, { ok: false, error: 'bad_client_secret' }),
    unknownClient: (req, res) => json(res, 200, { ok: false, error: 'invalid_client_id' }),
    // NOT IN REFERENCE: invalid_code, invalid_grant_type, invalid_auth, token_expired.
    badCode: (req, res) => json(res, 200, { ok: false, error: 'invalid_code' }),
    unsupportedGrant: (req, res) => json(res, 200, { ok: false, error: 'invalid_grant_type' }),
    meError: (status) => ({ ok: false, error: { revoked: 'token_revoked', expired: 'token_expired' }[status] ?? 'invalid_auth' }),
    routes: [{
      method: 'POST',
      match: (p) => p === '/api/auth.revoke',
      handle: (req, res, _m, body) => {
        const viaHeader = bearerOf(req);
        const token = viaHeader ?? formParams(body).token;
        recordRevocation(req, token, viaHeader ? 'bearer' : kindOf(token));
        const at = atStatus(token);
        if (at.status !== 'valid') {
          return json(res, 200, { ok: false, error: { revoked: 'token_revoked', expired: 'token_expired' }[at.status] ?? 'invalid_auth' });
        }
        killGrant(at.grant);
        json(res, 200, { ok: true, revoked: true });
      },
    }],
  },

  // GitHub App user-to-server tokens.
  //  Table A "GitHub OAuth app"/"GitHub App": token URL /login/oauth/access_token;
  //    client auth post (docs), basic (Arctic); revocation HTTP DELETE
  //    /applications/{client_id}/token (basic auth, JSON {access_token}) and .../grant.
  //  Table B "GitHub App (user-to-server)": expires_in, ghr_ RT with
  //    refresh_token_expires_in 15897600; rotation: the old RT AND the old AT stop working.
  //  Table D "GitHub": HTTP 200 errors, form-encoded unless Accept: application/json;
  //    bad_refresh_token; incorrect_client_credentials; bad_verification_code for codes.
  github: {
    tokenPath: (p) => p === '/login/oauth/access_token',
    authorizeAliases: ['/login/oauth/authorize'],
    authMethods: ['post', 'basic'],
    implicitCodeGrant: true,
    redirectUriOptional: true,
    tokens: { at: () => `ghu_${alnum(36)}`, rt: () => `ghr_${alnum(76)}`, code: () => crypto.randomBytes(10).toString('hex') },
    issueRtOnCode: () => true,
    rotation: 'revoke-old-and-at',
    success: (req, res, { at, rt }) => github(req, res, {
      access_token: at, expires_in: TTL, refresh_token: rt, refresh_token_expires_in: githubRtExpiresIn(), scope: '', token_type: 'bearer',
    }),
    deadRt: (req, res) => github(req, res, {
      error: 'bad_refresh_token', error_description: 'The refresh token passed is incorrect or expired.', error_uri: 'https://docs.github.com',
    }),
    wrongSecret: (req, res) => github(req, res, {
      error: 'incorrect_client_credentials', error_description: 'The client_id and/or client_secret passed are incorrect.',
    }),
    // NOT IN REFERENCE: the description of bad_verification_code and unsupported_grant_type.
    badCode: (req, res) => github(req, res, {
      error: 'bad_verification_code', error_description: 'The code passed is incorrect or expired.', error_uri: 'https://docs.github.com',
    }),
    unsupportedGrant: (req, res) => github(req, res, {
      error: 'unsupported_grant_type', error_description: 'The grant type is not supported.', error_uri: 'https://docs.github.com',
    }),
    routes: [{
      method: 'DELETE',
      match: (p) => /^\/applications\/([^/]+)\/(token|grant)$/.exec(p),
      handle: (req, res, m, body) => {
        let token;
        try { token = JSON.parse(body || '{}').access_token; } catch { token = undefined; }
        recordRevocation(req, token, 'access_token');
        // NOT IN REFERENCE: the REST API's bodies for bad credentials / unknown token.
        const basic = basicOf(req);
        if (!basic || basic.id !== decodeURIComponent(m[1]) || basic.id !== CLIENT_ID || basic.secret !== state.clientSecret) {
          return json(res, 401, { message: 'Bad credentials', documentation_url: 'https://docs.github.com/rest' });
        }
        const at = atStatus(token);
        if (at.status !== 'valid') return json(res, 404, { message: 'Not Found', documentation_url: 'https://docs.github.com/rest' });
        if (m[2] === 'grant') killGrant(at.grant);
        else at.entry.revoked = true;
        send(res, 204, '', null);
      },
    }],
  },

  // Microsoft Entra ID (v2.0 endpoint).
  //  Table A "Microsoft Entra ID": /{tenant}/oauth2/v2.0/token; no RFC 7009 endpoint;
  //    client auth post and basic.
  //  Table B "Microsoft Entra ID": expires_in present; RT needs the offline_access scope;
  //    a new RT on every use but the old RT is NOT revoked.
  //  Table D "Microsoft": 400 invalid_grant AADSTS700082 (inactive for 90.00:00:00);
  //    401 invalid_client AADSTS7000215; code problems: AADSTS70008.
  //  Table E: token_type `Bearer`.
  microsoft: {
    tokenPath: (p) => /^\/[^/]+\/oauth2\/v2\.0\/token$/.test(p),
    authorizeAliases: [/^\/[^/]+\/oauth2\/v2\.0\/authorize$/],
    authMethods: ['post', 'basic'],
    tokens: { at: () => `EwB${rnd(90)}`, rt: () => `0.A${rnd(150)}`, code: () => `0.A${rnd(100)}` },
    issueRtOnCode: (q) => hasScope(q.scope, 'offline_access'),
    rotation: 'keep-old',
    success: (req, res, { at, rt, grant }) => {
      const body = { token_type: 'Bearer', scope: grant.scope, expires_in: TTL, ext_expires_in: TTL, access_token: at };
      if (rt) body.refresh_token = rt;
      json(res, 200, body);
    },
    deadRt: (req, res) => {
      // .NET round-trip format, e.g. 2026-05-24T10:00:00.1230000Z
      const issued = new Date(Date.now() - 90 * 86400e3).toISOString().replace(/Z$/, '0000Z');
      microsoftError(res, 400, 'invalid_grant', 700082,
        `The refresh token has expired due to inactivity. The token was issued on ${issued} and was inactive for 90.00:00:00.`);
    },
    wrongSecret: (req, res) => microsoftError(res, 401, 'invalid_client', 7000215,
      `Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${CLIENT_ID}'.`),
    badCode: (req, res) => microsoftError(res, 400, 'invalid_grant', 70008,
      'The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.'),
    // NOT IN REFERENCE: AADSTS70003 for an unsupported grant type.
    unsupportedGrant: (req, res) => microsoftError(res, 400, 'unsupported_grant_type', 70003,
      'The app requested an unsupported grant type.'),
    routes: [],
  },

  // Salesforce.
  //  Table A "Salesforce": /services/oauth2/token; revocation POST /services/oauth2/revoke
  //    form token= (200 on success, 400 invalid_token on failure); introspection
  //    POST /services/oauth2/introspect (RFC 7662, active + exp); client auth post (docs), basic (Arctic).
  //  Table B "Salesforce": NO expires_in, only issued_at (epoch ms); RT only with the
  //    refresh_token / offline_access scope; rotation off (the connected-app default).
  //  Table C "Salesforce": instance_url, id, issued_at, signature.
  //  Table D "Salesforce": 400 invalid_grant "expired access/refresh token";
  //    invalid_client "invalid client credentials"; wrong id: 400 invalid_client_id
  //    "client identifier invalid"; expired AT on the API: 401 array envelope INVALID_SESSION_ID.
  salesforce: {
    tokenPath: (p) => p === '/services/oauth2/token',
    authorizeAliases: ['/services/oauth2/authorize'],
    authMethods: ['post', 'basic'],
    tokens: { at: () => `00D000000000001!${alnum(96)}`, rt: () => `5Aep861${alnum(80)}`, code: () => `aPrx${alnum(60)}` },
    // No scope parameter means "the connected app's scopes", assumed to include refresh_token.
    issueRtOnCode: (q) => q.scope === undefined || hasScope(q.scope, 'refresh_token') || hasScope(q.scope, 'offline_access'),
    rotation: 'none',
    success: (req, res, { at, rt, kind }) => {
      const id = 'https://login.salesforce.com/id/00D/005';
      const issuedAt = String(Date.now());
      const body = { access_token: at };
      if (kind === 'code' && rt) body.refresh_token = rt; // a refresh answer has no refresh_token
      Object.assign(body, {
        instance_url: 'https://acme.my.salesforce.com',
        id,
        token_type: 'Bearer',
        issued_at: issuedAt,
        // Salesforce's scheme: base64 HMAC-SHA256 of id + issued_at keyed by the client secret.
        signature: crypto.createHmac('sha256', state.clientSecret).update(id + issuedAt).digest('base64'),
      });
      json(res, 200, body);
    },
    deadRt: (req, res) => json(res, 400, { error: 'invalid_grant', error_description: 'expired access/refresh token' }),
    wrongSecret: (req, res) => json(res, 400, { error: 'invalid_client', error_description: 'invalid client credentials' }),
    unknownClient: (req, res) => json(res, 400, { error: 'invalid_client_id', error_description: 'client identifier invalid' }),
    // NOT IN REFERENCE: the bad-code and unsupported-grant wording.
    badCode: (req, res) => json(res, 400, { error: 'invalid_grant', error_description: 'authentication failure' }),
    unsupportedGrant: (req, res) => json(res, 400, { error: 'unsupported_grant_type', error_description: 'grant type not supported' }),
    meError: () => [{ message: 'Session expired or invalid', errorCode: 'INVALID_SESSION_ID' }],
    routes: [{
      method: 'POST',
      match: (p) => p === '/services/oauth2/revoke',
      handle: (req, res, _m, body, url) => {
        const token = formParams(body).token ?? url.searchParams.get('token') ?? undefined;
        recordRevocation(req, token, kindOf(token));
        const rt = rtStatus(token);
        if (rt.status === 'valid') { killGrant(rt.grant); return send(res, 200, '', null); } // RT: the grant dies
        const at = atStatus(token);
        if (at.status === 'valid') { at.entry.revoked = true; return send(res, 200, '', null); } // AT: that token only
        json(res, 400, { error: 'invalid_token' }); // NOT IN REFERENCE: a description
      },
    }, {
      method: 'POST',
      match: (p) => p === '/services/oauth2/introspect',
      handle: (req, res, _m, body) => {
        const params = formParams(body);
        const auth = checkClient(req, res, params, { record: false });
        if (auth.fail) return auth.fail();
        seen(params.token);
        const at = atStatus(params.token);
        const rt = rtStatus(params.token);
        const live = at.status === 'valid' ? at : rt.status === 'valid' ? rt : null;
        if (!live) return json(res, 200, { active: false });
        const out = {
          active: true, scope: live.grant.scope, client_id: CLIENT_ID, username: 'u1@acme.example',
          sub: 'https://login.salesforce.com/id/00D/005', token_type: live === at ? 'access_token' : 'refresh_token',
        };
        if (live === at) Object.assign(out, { exp: Math.floor(at.entry.exp / 1000), iat: Math.floor((at.entry.exp - TTL * 1000) / 1000) });
        json(res, 200, out);
      },
    }],
  },

  // Google.
  //  Table A "Google": token URL /token; revocation /revoke (RFC 7009; accepts AT or RT);
  //    client auth basic and post.
  //  Table B "Google": expires_in present; RT only with access_type=offline, prompt=consent
  //    to get one again on re-consent; not rotated, the refresh answer has no refresh_token.
  //  Table D "Google": 400 invalid_grant "Token has been expired or revoked.";
  //    401 invalid_client "Unauthorized".
  //  Table E: token_type `Bearer`.
  google: {
    tokenPath: (p) => p === '/token',
    authorizeAliases: ['/o/oauth2/v2/auth'],
    authMethods: ['basic', 'post'],
    tokens: { at: () => `ya29.${rnd(120)}`, rt: () => `1//0${rnd(75)}`, code: () => `4/0${rnd(60)}` },
    // "Already consented" = the client has a grant that was not revoked (mint counts).
    issueRtOnCode: (q) => q.access_type === 'offline'
      && (!liveGrantFor(q.client_id) || (q.prompt ?? '').split(/\s+/).includes('consent')),
    rotation: 'none',
    success: (req, res, { at, rt, grant, kind }) => {
      const body = { access_token: at, expires_in: TTL };
      if (kind === 'code' && rt) body.refresh_token = rt;
      Object.assign(body, { scope: grant.scope, token_type: 'Bearer' });
      json(res, 200, body);
    },
    deadRt: (req, res) => json(res, 400, { error: 'invalid_grant', error_description: 'Token has been expired or revoked.' }),
    wrongSecret: (req, res) => json(res, 401, { error: 'invalid_client', error_description: 'Unauthorized' }),
    // NOT IN REFERENCE: unknown client, bad code, unsupported grant, failed revocation wording.
    unknownClient: (req, res) => json(res, 401, { error: 'invalid_client', error_description: 'The OAuth client was not found.' }),
    badCode: (req, res) => json(res, 400, { error: 'invalid_grant', error_description: 'Bad Request' }),
    unsupportedGrant: (req, res) => json(res, 400, { error: 'unsupported_grant_type', error_description: 'Invalid grant_type' }),
    routes: [{
      method: 'POST',
      match: (p) => p === '/revoke',
      handle: (req, res, _m, body, url) => {
        const token = formParams(body).token ?? url.searchParams.get('token') ?? undefined;
        recordRevocation(req, token, kindOf(token));
        const live = [rtStatus(token), atStatus(token)].find((s) => s.status === 'valid');
        if (!live) return json(res, 400, { error: 'invalid_token', error_description: 'Token expired or revoked' });
        killGrant(live.grant); // revoking either token ends the grant
        send(res, 200, '', null);
      },
    }],
  },

  // Dropbox.
  //  Table A "Dropbox": /oauth2/token; revocation POST /2/auth/token/revoke (bearer token,
  //    no body; custom); client auth basic and post.
  //  Table B "Dropbox": expires_in present; RT only with token_access_type=offline;
  //    not rotated: the refresh answer holds only access_token, token_type, expires_in.
  //  Table D "Dropbox": 400 invalid_grant "refresh token is malformed"; expired AT on the
  //    API: 401 {"error":{".tag":"expired_access_token"},"error_summary":"expired_access_token/"}.
  //  Table E: token_type lowercase `bearer`.
  dropbox: {
    tokenPath: (p) => p === '/oauth2/token',
    authorizeAliases: ['/oauth2/authorize'],
    authMethods: ['basic', 'post'],
    tokens: { at: () => `sl.${rnd(120)}`, rt: () => alnum(64), code: () => alnum(43) },
    issueRtOnCode: (q) => q.token_access_type === 'offline',
    rotation: 'none',
    success: (req, res, { at, rt, grant, kind }) => {
      if (kind === 'refresh') return json(res, 200, { access_token: at, token_type: 'bearer', expires_in: TTL });
      const body = { access_token: at, token_type: 'bearer', expires_in: TTL };
      if (rt) body.refresh_token = rt;
      Object.assign(body, { scope: grant.scope, uid: '12345', account_id: 'dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc' });
      json(res, 200, body);
    },
    deadRt: (req, res) => json(res, 400, { error: 'invalid_grant', error_description: 'refresh token is malformed' }),
    // NOT IN REFERENCE (Table D: "unknown"): the wrong-secret, bad-code and unsupported-grant bodies.
    wrongSecret: (req, res) => json(res, 400, { error: 'invalid_client', error_description: 'Invalid client_id or client_secret' }),
    badCode: (req, res) => json(res, 400, { error: 'invalid_grant', error_description: "code doesn't exist or has expired" }),
    unsupportedGrant: (req, res) => json(res, 400, { error: 'unsupported_grant_type' }),
    meError: (status) => (status === 'expired'
      ? { error: { '.tag': 'expired_access_token' }, error_summary: 'expired_access_token/' }
      : { error: { '.tag': 'invalid_access_token' }, error_summary: 'invalid_access_token/' }),
    routes: [{
      method: 'POST',
      match: (p) => p === '/2/auth/token/revoke',
      handle: (req, res) => {
        const token = bearerOf(req);
        recordRevocation(req, token, 'bearer');
        const at = atStatus(token);
        if (at.status !== 'valid') {
          return json(res, 401, FAMILY.meError(at.status), { 'WWW-Authenticate': 'Bearer error="invalid_token"' });
        }
        killGrant(at.grant);
        send(res, 200, 'null', JSON_CT);
      },
    }],
  },

  // Xero.
  //  Table A "Xero": /connect/token; revocation POST /connect/revocation with the RT,
  //    RFC 7009-style, removes all of the user's connections; client auth basic
  //    (documented), post unknown -> rejected here as invalid_client (brief).
  //  Table B "Xero": expires_in present; RT needs offline_access; rotates every refresh;
  //    the previous RT may be retried for a grace window (30 min there, --grace here).
  //  Table D "Xero": 400 {"error":"invalid_grant"} with no description; wrong secret unknown.
  //  Table E: token_type `Bearer`.
  xero: {
    tokenPath: (p) => p === '/connect/token',
    authorizeAliases: ['/identity/connect/authorize'],
    authMethods: ['basic'],
    tokens: { at: () => rnd(160), rt: () => crypto.randomBytes(32).toString('hex'), code: () => crypto.randomBytes(32).toString('hex') },
    issueRtOnCode: (q) => hasScope(q.scope, 'offline_access'),
    rotation: 'grace',
    success: (req, res, { at, rt, grant }) => {
      const body = { access_token: at, expires_in: TTL, token_type: 'Bearer' };
      if (rt) body.refresh_token = rt;
      body.scope = grant.scope;
      json(res, 200, body);
    },
    deadRt: (req, res) => json(res, 400, { error: 'invalid_grant' }),
    badCode: (req, res) => json(res, 400, { error: 'invalid_grant' }),
    // NOT IN REFERENCE: the wrong-secret body (same as the post rejection) and unsupported grant.
    wrongSecret: (req, res) => json(res, 400, { error: 'invalid_client' }),
    badAuthMethod: (req, res) => json(res, 400, { error: 'invalid_client' }),
    unsupportedGrant: (req, res) => json(res, 400, { error: 'unsupported_grant_type' }),
    routes: [{
      method: 'POST',
      match: (p) => p === '/connect/revocation',
      handle: (req, res, _m, body) => {
        const params = formParams(body);
        recordRevocation(req, params.token, kindOf(params.token));
        // Client credentials are checked when sent; NOT IN REFERENCE whether they are required.
        if (req.headers.authorization || params.client_secret !== undefined) {
          const auth = checkClient(req, res, params, { record: false });
          if (auth.fail) return auth.fail();
        }
        const live = [rtStatus(params.token), atStatus(params.token)].find((s) => s.status === 'valid');
        if (live) killGrant(live.grant); // removes the whole connection
        send(res, 200, '', null); // RFC 7009 2.2: 200 for unknown tokens too
      },
    }],
  },
};

const FAMILY = FAMILIES[OPTS.family];

function kindOf(token) {
  if (token && state.rts.has(token)) return 'refresh_token';
  if (token && state.ats.has(token)) return 'access_token';
  return 'unknown';
}
function recordRevocation(req, token, kind) {
  seen(token);
  stats.revocations.push({ path: new URL(req.url, 'http://x').pathname, method: req.method, token: token ?? null, kind });
}

/**
 * Client authentication by the family's rules. Returns {method, fail?}; fail is a
 * function sending the family's answer.
 */
function checkClient(req, res, params, { record = true } = {}) {
  const basic = basicOf(req);
  const hasPost = params.client_id !== undefined || params.client_secret !== undefined;
  let method;
  let creds;
  if (basic && FAMILY.authMethods.includes('basic')) { method = 'basic'; creds = basic; }
  else if (hasPost && FAMILY.authMethods.includes('post')) { method = 'post'; creds = { id: params.client_id, secret: params.client_secret }; }
  else if (basic) method = 'basic';
  else if (hasPost) method = 'post';
  else method = 'none';
  if (record) stats.clientAuth.push(method);
  const fail = (fn) => ({ method, fail: () => fn(req, res) });
  if (!creds) {
    // Presented a method the family does not take, or nothing at all.
    if (method === 'none') return fail(FAMILY.unknownClient ?? FAMILY.wrongSecret);
    return fail(FAMILY.badAuthMethod ?? FAMILY.wrongSecret);
  }
  if (creds.id !== CLIENT_ID) return fail(FAMILY.unknownClient ?? FAMILY.wrongSecret);
  if (creds.secret !== state.clientSecret) return fail(FAMILY.wrongSecret);
  return { method, clientId: creds.id };
}

// ---------------------------------------------------------------- endpoints

function handleAuthorize(req, res, url) {
  const q = Object.fromEntries(url.searchParams);
  stats.authorizeRequests.push(q);
  if (q.client_id !== CLIENT_ID) return send(res, 400, `unknown client_id ${JSON.stringify(q.client_id ?? null)}\n`, 'text/plain; charset=utf-8');
  let target;
  try { target = new URL(q.redirect_uri); } catch {
    return send(res, 400, 'missing or invalid redirect_uri\n', 'text/plain; charset=utf-8');
  }
  if (q.response_type !== 'code') {
    target.searchParams.set('error', 'unsupported_response_type');
  } else {
    const code = FAMILY.tokens.code();
    seen(code);
    state.codes.set(code, {
      clientId: q.client_id,
      redirectUri: q.redirect_uri,
      challenge: q.code_challenge,
      method: q.code_challenge ? (q.code_challenge_method ?? 'plain') : null,
      scope: q.scope ?? '',
      issueRt: FAMILY.issueRtOnCode(q), // decided at consent time
      exp: Date.now() + CODE_TTL_MS,
      used: false,
    });
    target.searchParams.set('code', code);
  }
  if (q.state !== undefined) target.searchParams.set('state', q.state);
  // Values a provider sends in the redirect rather than the token answer
  // (QuickBooks' realmId), set by a test.
  for (const [name, value] of Object.entries(state.redirectExtra ?? {})) target.searchParams.set(name, value);
  send(res, 302, '', null, { Location: target.toString() });
}

function pkceOk(rec, verifier) {
  if (!rec.challenge) return true;
  if (typeof verifier !== 'string' || verifier === '') return false;
  if (rec.method === 'S256') return crypto.createHash('sha256').update(verifier).digest('base64url') === rec.challenge;
  if (rec.method === 'plain') return verifier === rec.challenge;
  return false;
}

function handleToken(req, res, url, body) {
  stats.tokenRequests++;
  stats.accepts.push(req.headers.accept ?? null);
  const params = FAMILY.queryParamsToo ? { ...Object.fromEntries(url.searchParams), ...formParams(body) } : formParams(body);
  seen(params.code);
  seen(params.refresh_token);
  let grantType = params.grant_type;
  if (grantType === undefined && FAMILY.implicitCodeGrant && params.code !== undefined) grantType = 'authorization_code';
  if (grantType === 'refresh_token') stats.refreshes++;
  if (grantType === 'authorization_code') stats.codeExchanges++;

  const auth = checkClient(req, res, params);
  if (auth.fail) return auth.fail();

  if (grantType === 'authorization_code') {
    const rec = state.codes.get(params.code);
    if (!rec || rec.used || Date.now() >= rec.exp || rec.clientId !== auth.clientId) return FAMILY.badCode(req, res);
    rec.used = true; // single use, whatever happens next
    const redirectOk = params.redirect_uri === rec.redirectUri || (FAMILY.redirectUriOptional && params.redirect_uri === undefined);
    if (!redirectOk || !pkceOk(rec, params.code_verifier)) return FAMILY.badCode(req, res);
    const grant = newGrant(auth.clientId, rec.scope);
    const at = issueAt(grant);
    const rt = rec.issueRt ? issueRt(grant) : undefined;
    return FAMILY.success(req, res, { grant, at, rt, kind: 'code' });
  }

  if (grantType === 'refresh_token') {
    const presented = params.refresh_token;
    const st = rtStatus(presented);
    if (st.status !== 'valid' || st.grant.clientId !== auth.clientId) return FAMILY.deadRt(req, res);
    const { grant } = st;
    let rt;
    switch (FAMILY.rotation) {
      case 'none':
        rt = presented;
        break;
      case 'revoke-old': // Slack: the old RT is revoked
        st.entry.revoked = true;
        rt = issueRt(grant);
        break;
      case 'revoke-old-and-at': // GitHub App: the old RT and the old AT stop working
        st.entry.revoked = true;
        for (const t of grant.ats) state.ats.get(t).revoked = true;
        rt = issueRt(grant);
        break;
      case 'keep-old': // Microsoft: new RT, the old one stays usable
        rt = issueRt(grant);
        break;
      case 'grace': { // Xero: every earlier RT still in use gets `--grace` seconds
        rt = issueRt(grant);
        const deadline = Date.now() + OPTS.grace * 1000;
        for (const t of grant.rts) {
          const e = state.rts.get(t);
          if (t !== rt && e.deadAt === null) e.deadAt = deadline;
        }
        break;
      }
      default: throw new Error(`rotation ${FAMILY.rotation}`);
    }
    const at = issueAt(grant);
    return FAMILY.success(req, res, { grant, at, rt, kind: 'refresh' });
  }

  return FAMILY.unsupportedGrant(req, res);
}

function handleMe(req, res) {
  const token = bearerOf(req);
  seen(token);
  const { status } = atStatus(token);
  if (status === 'valid') return json(res, 200, { id: 'u1' });
  const body = FAMILY.meError ? FAMILY.meError(status) : { error: 'invalid_token' };
  json(res, 401, body, { 'WWW-Authenticate': 'Bearer error="invalid_token"' });
}

function parseJson(body) {
  if (body.trim() === '') return {};
  const value = JSON.parse(body);
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('expected a JSON object');
  return value;
}

// GitHub's documented refresh_token_expires_in, or the seconds left until
// a deadline a test set.
function githubRtExpiresIn() {
  if (state.grantDeadline === undefined) return 15897600;
  return Math.max(0, Math.round((state.grantDeadline - Date.now()) / 1000));
}

function handleControl(req, res, pathname, body) {
  if (req.method === 'GET' && pathname === '/control/stats') {
    return json(res, 200, { ...stats, secretsSeen: [...stats.secretsSeen] });
  }
  if (req.method !== 'POST') return json(res, 405, { error: 'method_not_allowed' });
  let input;
  try { input = parseJson(body); } catch (e) { return json(res, 400, { error: 'bad_json', message: String(e.message) }); }
  switch (pathname) {
    case '/control/mint': {
      if (input.scope !== undefined && typeof input.scope !== 'string') return json(res, 400, { error: 'scope must be a string' });
      const grant = newGrant(CLIENT_ID, input.scope ?? '');
      return json(res, 200, { refresh_token: issueRt(grant) });
    }
    case '/control/revoke-all':
      for (const grant of state.grants.values()) killGrant(grant);
      return json(res, 200, { ok: true });
    // Test control: from now on the grant ends `seconds` from now, whatever
    // is refreshed (GitHub's refresh_token_expires_in counts down to it), as
    // a provider's absolute grant lifetime would.
    case '/control/grant-deadline':
      if (!Number.isInteger(input.seconds) || input.seconds < 0) return json(res, 400, { error: 'seconds must be a non-negative integer' });
      state.grantDeadline = Date.now() + input.seconds * 1000;
      return json(res, 200, { ok: true });
    case '/control/redirect-extra':
      state.redirectExtra = input;
      return json(res, 200, { ok: true });
    case '/control/client-secret':
      if (typeof input.secret !== 'string' || input.secret === '') return json(res, 400, { error: 'secret must be a non-empty string' });
      state.clientSecret = input.secret;
      return json(res, 200, { ok: true });
    default:
      return json(res, 404, { error: 'not_found' });
  }
}

const matchesAuthorize = (p) => p === '/authorize'
  || FAMILY.authorizeAliases.some((a) => (typeof a === 'string' ? a === p : a.test(p)));

async function route(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  const p = url.pathname;
  const body = await readBody(req);
  if (OPTS.verbose) process.stderr.write(`${new Date().toISOString()} ${req.method} ${p}\n`);

  if (p.startsWith('/control/')) return handleControl(req, res, p, body);
  if (req.method === 'GET' && matchesAuthorize(p)) return handleAuthorize(req, res, url);
  if (req.method === 'GET' && p === '/me') return handleMe(req, res);
  if (FAMILY.tokenPath(p)) {
    if (req.method !== 'POST') return json(res, 405, { error: 'method_not_allowed' }, { Allow: 'POST' });
    return handleToken(req, res, url, body);
  }
  for (const r of FAMILY.routes) {
    const m = r.match(p);
    if (m === undefined || m === null || m === false) continue;
    if (req.method !== r.method) return json(res, 405, { error: 'method_not_allowed' }, { Allow: r.method });
    return r.handle(req, res, m, body, url);
  }
  json(res, 404, { error: 'not_found', path: p });
}

// ---------------------------------------------------------------- server

const server = http.createServer((req, res) => {
  route(req, res).catch((err) => {
    process.stderr.write(`emulator: ${req.method} ${req.url}: ${err?.stack ?? err}\n`);
    if (!res.headersSent) send(res, 500, 'internal error\n', 'text/plain; charset=utf-8');
    else res.destroy();
  });
});
// Clients pool connections; a long idle timeout avoids a pooled connection
// being closed by the server just as it is reused.
server.keepAliveTimeout = 65_000;
server.headersTimeout = 66_000;
server.on('error', (err) => { process.stderr.write(`emulator: ${err.stack ?? err}\n`); process.exit(1); });
const listening = [new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))];
if (OPTS.tlsAddress) {
  const [host, port] = [OPTS.tlsAddress.slice(0, OPTS.tlsAddress.lastIndexOf(':')), Number(OPTS.tlsAddress.slice(OPTS.tlsAddress.lastIndexOf(':') + 1))];
  const tls = https.createServer({ cert: fs.readFileSync(OPTS.tlsCert), key: fs.readFileSync(OPTS.tlsKey) }, (req, res) => {
    route(req, res).catch((err) => {
      process.stderr.write(`emulator: ${req.method} ${req.url}: ${err?.stack ?? err}\n`);
      if (!res.headersSent) send(res, 500, 'internal error\n', 'text/plain; charset=utf-8');
      else res.destroy();
    });
  });
  tls.on('error', (err) => { process.stderr.write(`emulator (tls): ${err.stack ?? err}\n`); process.exit(1); });
  listening.push(new Promise((resolve) => tls.listen(port, host, resolve)));
}
Promise.all(listening).then(() => {
  process.stdout.write(`{"port": ${server.address().port}}\n`);
});

const stop = () => process.exit(0);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
// A test that dies closes our stdin: do not outlive it.
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.on('error', stop);
process.stdin.resume();

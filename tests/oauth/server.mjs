// The OAuth 2.0 provider of the integration tests: oidc-provider (OpenID
// Certified) on 127.0.0.1 with lifetimes of seconds, plus out-of-band
// controls under /test/ that stand for what a user or an outage does at a
// real provider (revoke the app, narrow its scopes, fail).
//
// Usage: node server.mjs '{"accessTokenTtl": 4, ...}'
// Prints one JSON line {"issuer": ..., "port": ...} once it listens.
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';

const options = {
  accessTokenTtl: 60, // seconds
  refreshTokenTtl: 3600, // absolute, counted from the first issue of the grant
  rotateRefreshToken: true,
  omitExpiresIn: false, // answer without expires_in, as some providers do
  omitUnrotatedRefreshToken: false, // Google-style: no refresh_token when it is not rotated
  reportRefreshTokenExpiresIn: true, // GitHub-style refresh_token_expires_in
  redirectUris: ['http://127.0.0.1/callback'], // where the consent flow may return
  // 'native' lets loopback redirects use any port (RFC 8252), as a CLI needs.
  applicationType: 'web',
  ...JSON.parse(process.argv[2] ?? '{}'),
};

const RESOURCE = 'https://crm.test/api';
const RESOURCE_SCOPES = ['crm.read', 'crm.write', 'crm.admin'];
const ACCOUNT = 'alice';

// An in-memory store that never evicts (oidc-provider's default one evicts
// after a few thousand writes, which long runs exceed).
const store = new Map();
const stats = {
  tokenRequests: 0, tokenSuccesses: 0, refreshTokenReuse: 0, revocations: 0, errors: {}, reuseTimes: [],
  // When each token request arrived (ms since the epoch), and what each
  // revocation request sent: {token, hint, kind, status}.
  tokenRequestTimes: [], revocationRequests: [],
  // Every secret value that crossed the token endpoint: tokens issued,
  // authorization codes and PKCE verifiers; no operator output may hold one.
  secretsSeen: [],
  // Refresh tokens and PKCE verifiers only: no Secret may hold one in
  // plaintext (access tokens belong in the target Secret).
  grantSecretsSeen: [],
};
class TestAdapter {
  constructor(model) { this.model = model; }
  key(id) { return `${this.model}:${id}`; }
  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), { payload, expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : undefined });
  }
  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt && entry.expiresAt < Date.now()) { store.delete(this.key(id)); return undefined; }
    return entry.payload;
  }
  async findByUserCode(userCode) { return this.findBy((p) => p.userCode === userCode); }
  async findByUid(uid) { return this.findBy((p) => p.uid === uid); }
  async findBy(predicate) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.model}:`) && predicate(entry.payload)) return entry.payload;
    }
    return undefined;
  }
  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }
  async destroy(id) { store.delete(this.key(id)); }
  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

const clients = [
  {
    client_id: 'crm-client',
    client_secret: 'crm-client-secret',
    application_type: options.applicationType,
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    redirect_uris: options.redirectUris,
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    scope: ['openid', 'offline_access', ...RESOURCE_SCOPES].join(' '),
  },
  {
    client_id: 'crm-post-client',
    client_secret: 'crm-post-client-secret',
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    redirect_uris: options.redirectUris,
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_post',
    scope: ['openid', 'offline_access', ...RESOURCE_SCOPES].join(' '),
  },
];

const server = http.createServer();
await new Promise((resolve) => server.listen(options.port ?? 0, '127.0.0.1', resolve));
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  adapter: TestAdapter,
  clients,
  findAccount: async (_ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
  scopes: ['openid', 'offline_access', ...RESOURCE_SCOPES],
  rotateRefreshToken: options.rotateRefreshToken,
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: {
    AccessToken: options.accessTokenTtl,
    ClientCredentials: options.accessTokenTtl,
    RefreshToken: (_ctx, token) => {
      const firstIssued = token.iiat ?? Math.floor(Date.now() / 1000);
      return Math.max(1, firstIssued + options.refreshTokenTtl - Math.floor(Date.now() / 1000));
    },
    Grant: 14 * 24 * 3600,
    Session: 3600,
    Interaction: 600,
    AuthorizationCode: 60,
  },
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => RESOURCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async () => ({
        scope: RESOURCE_SCOPES.join(' '),
        accessTokenFormat: 'opaque',
        accessTokenTTL: options.accessTokenTtl,
      }),
    },
  },
});
provider.proxy = false;

provider.on('grant.error', (_ctx, error) => {
  stats.errors[error.error] = (stats.errors[error.error] ?? 0) + 1;
  if (error.error_detail === 'refresh token already used') {
    stats.refreshTokenReuse += 1;
    stats.reuseTimes.push(Date.now());
  }
});
provider.on('grant.success', () => { stats.tokenSuccesses += 1; });
provider.on('revocation.success', () => { stats.revocations += 1; });

let failure = { mode: 'off' };
let apiMode = 'normal';
// How successful token answers are reshaped, as providers documented to
// deviate from RFC 6749 answer: {"shape": ..., "times": N} (N answers, then
// normal again; without times, until changed).
let answerShape = { shape: 'normal' };
const SHAPES = {
  normal: () => {},
  // Azure AD v1: numbers as strings.
  'azure-v1': (body) => {
    body.expires_in = String(body.expires_in);
    if (body.refresh_token_expires_in !== undefined) {
      body.refresh_token_expires_in = String(body.refresh_token_expires_in);
    }
  },
  // LinkedIn: no token_type.
  linkedin: (body) => { delete body.token_type; },
  // An answer the operator cannot use, after the refresh token was rotated.
  'no-access-token': (body) => { delete body.access_token; },
  'huge-lifetime': (body) => { body.expires_in = 1000000000000; },
  'zero-lifetime': (body) => { body.expires_in = 0; },
  // A rotated refresh token too large to keep in an annotation (256 KiB).
  'huge-refresh-token': (body) => { body.refresh_token = 'r'.repeat(300 * 1024); },
  // Salesforce: the API host for this grant comes with each token.
  'instance-url': (body) => { body.instance_url = 'https://eu42.crm.test'; },
  // An answer of 64 MiB, as the hostile provider of issue 22 sent.
  oversized: (body) => { body.padding = 'p'.repeat(64 * 1024 * 1024); },
};

provider.use(async (ctx, next) => {
  if (ctx.path.startsWith('/test/')) {
    await testControl(ctx);
    return;
  }
  if (ctx.path === '/token' || ctx.path === '/token/revocation') {
    if (ctx.path === '/token') {
      stats.tokenRequests += 1;
      stats.tokenRequestTimes.push(Date.now());
    }
    if (failure.mode === '500') {
      ctx.status = 500; ctx.type = 'application/json'; ctx.body = { error: 'server_error' };
      return;
    }
    if (failure.mode === '429') {
      ctx.status = 429; ctx.set('Retry-After', String(failure.retryAfter ?? 3));
      ctx.type = 'application/json'; ctx.body = { error: 'rate_limited' };
      return;
    }
    if (failure.mode === 'html') {
      ctx.status = 200; ctx.type = 'text/html'; ctx.body = '<html><body>Maintenance</body></html>';
      return;
    }
    if (failure.mode === 'hang') {
      await new Promise((resolve) => setTimeout(resolve, 120_000));
      return;
    }
  }
  await next();
  if (ctx.path === '/token/revocation') {
    const entities = ctx.oidc?.entities ?? {};
    stats.revocationRequests.push({
      token: ctx.oidc?.params?.token,
      hint: ctx.oidc?.params?.token_type_hint,
      kind: ['RefreshToken', 'AccessToken', 'ClientCredentials'].find((kind) => entities[kind]),
      status: ctx.status,
    });
  }
  if (ctx.path === '/token') {
    for (const value of [ctx.oidc?.params?.code, ctx.oidc?.params?.code_verifier,
      ctx.oidc?.params?.refresh_token, ctx.body?.access_token, ctx.body?.refresh_token]) {
      if (typeof value === 'string' && value.length >= 8) stats.secretsSeen.push(value);
    }
    for (const value of [ctx.oidc?.params?.code_verifier, ctx.oidc?.params?.refresh_token,
      ctx.body?.refresh_token]) {
      if (typeof value === 'string' && value.length >= 8) stats.grantSecretsSeen.push(value);
    }
  }
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    if (options.omitExpiresIn) delete ctx.body.expires_in;
    // Google-style: a refresh that does not rotate sends no refresh_token.
    if (options.omitUnrotatedRefreshToken && ctx.oidc?.params?.grant_type === 'refresh_token'
      && ctx.body.refresh_token === ctx.oidc.params.refresh_token) {
      delete ctx.body.refresh_token;
    }
    const refreshToken = ctx.oidc?.entities?.RefreshToken;
    if (options.reportRefreshTokenExpiresIn && ctx.body.refresh_token && refreshToken) {
      ctx.body.refresh_token_expires_in = refreshToken.remainingTTL;
    }
    if (answerShape.shape !== 'normal') {
      SHAPES[answerShape.shape](ctx.body);
      stats.shapedAnswers = (stats.shapedAnswers ?? 0) + 1;
      if (answerShape.times !== undefined && --answerShape.times <= 0) answerShape = { shape: 'normal' };
    }
  }
});

async function readJson(ctx) {
  let raw = '';
  for await (const chunk of ctx.req) raw += chunk;
  return raw ? JSON.parse(raw) : {};
}

function grantsOf(clientId) {
  const grants = [];
  for (const [key, entry] of store) {
    if (key.startsWith('Grant:') && entry.payload.clientId === clientId) grants.push(key.slice('Grant:'.length));
  }
  return grants;
}

async function testControl(ctx) {
  const body = ctx.method === 'POST' ? await readJson(ctx) : {};
  ctx.type = 'application/json';
  switch (ctx.path) {
    case '/test/stats':
      ctx.body = stats;
      return;
    case '/test/failure':
      // {"mode": "off" | "500" | "429" | "html" | "hang", "retryAfter": 3}
      failure = body;
      ctx.body = failure;
      return;
    case '/test/mint-refresh-token': {
      // Stands for a user who consented elsewhere: a grant for `scope`
      // and its refresh token, as another system would hand it over.
      const client = await provider.Client.find(body.clientId ?? 'crm-client');
      const scope = body.scope ?? 'crm.read';
      const grant = new provider.Grant({ accountId: ACCOUNT, clientId: client.clientId });
      grant.addOIDCScope('openid offline_access');
      grant.addResourceScope(RESOURCE, scope);
      const grantId = await grant.save();
      const refreshToken = new provider.RefreshToken({
        accountId: ACCOUNT,
        client,
        grantId,
        gty: 'authorization_code',
        scope: `openid offline_access ${scope}`,
        resource: RESOURCE,
        iiat: Math.floor(Date.now() / 1000),
      });
      ctx.body = { refresh_token: await refreshToken.save(), grant_id: grantId };
      return;
    }
    case '/test/revoke-grants': {
      // The user disconnects the app at the provider: every grant of the
      // client and all its tokens go at once.
      const grantIds = grantsOf(body.clientId ?? 'crm-client');
      for (const grantId of grantIds) {
        for (const [key, entry] of store) {
          if (entry.payload.grantId === grantId || key === `Grant:${grantId}`) store.delete(key);
        }
      }
      ctx.body = { revoked: grantIds.length };
      return;
    }
    case '/test/narrow-scopes': {
      // The user's role changes: the grant keeps only `scope`.
      const grantIds = grantsOf(body.clientId ?? 'crm-client');
      for (const grantId of grantIds) {
        const grant = await provider.Grant.find(grantId);
        grant.resources[RESOURCE] = body.scope;
        await grant.save();
      }
      ctx.body = { narrowed: grantIds.length };
      return;
    }
    case '/test/api': {
      // A protected API the connections can verify their token against:
      // GET /test/api?scope=crm.write with a bearer token. RFC 6750 answers.
      const token = (ctx.get('authorization').match(/^Bearer (.+)$/) ?? [])[1];
      const found = token && ((await provider.AccessToken.find(token)) ?? (await provider.ClientCredentials.find(token)));
      if (apiMode === '401' || !found || found.isExpired) {
        ctx.status = 401;
        ctx.set('WWW-Authenticate', 'Bearer error="invalid_token"');
        ctx.body = { error: 'invalid_token' };
        return;
      }
      const needed = ctx.query.scope;
      const granted = new Set((found.scope ?? '').split(' '));
      if (needed && !granted.has(needed)) {
        ctx.status = 403;
        ctx.set('WWW-Authenticate', `Bearer error="insufficient_scope", scope="${needed}"`);
        ctx.body = { error: 'insufficient_scope' };
        return;
      }
      ctx.body = { ok: true, scope: found.scope };
      return;
    }
    case '/test/answer-shape':
      if (!SHAPES[body.shape]) { ctx.status = 400; ctx.body = { error: 'unknown shape' }; return; }
      answerShape = body;
      ctx.body = answerShape;
      return;
    case '/test/api-mode':
      // {"mode": "normal" | "401"}: "401" refuses every token.
      apiMode = body.mode;
      ctx.body = { mode: apiMode };
      return;
    case '/test/introspect': {
      // What the provider thinks of a token, without client credentials.
      const token = body.token;
      const found = (await provider.AccessToken.find(token))
        ?? (await provider.RefreshToken.find(token))
        ?? (await provider.ClientCredentials.find(token));
      const active = Boolean(found && !found.isExpired && !found.consumed
        && (!found.grantId || await provider.Grant.find(found.grantId)));
      ctx.body = { active, scope: found?.scope };
      return;
    }
    default:
      ctx.status = 404;
      ctx.body = { error: 'unknown test control' };
  }
}

server.on('request', provider.callback());
// stdout carries only the line below, which the tests read before closing
// the pipe; everything oidc-provider says goes to stderr.
console.log = console.info = (...args) => console.error(...args);
process.stdout.write(`${JSON.stringify({ issuer, port, id: randomUUID() })}\n`);
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));

// A real OAuth2 authorization server for the tests: oidc-provider (panva) set up for the
// client credentials grant as SMART Backend Services uses it.
//
//   client authentication: client_secret_basic, client_secret_post, private_key_jwt (RS384/ES384)
//   access tokens:         JWT (RFC 9068 style) signed RS256, aud = RESOURCE (resource indicators,
//                          RFC 8707), verifiable with the keys at /jwks
//   discovery:             /.well-known/openid-configuration (alias oauth-authorization-server)
//
// Started by tests/fhir_servers.py; oidc-provider (package.json, package-lock.json here) is
// installed by scripts/test.sh (npm_install tests/oauth) into .infra/node/oauth. ES modules
// resolve packages from the script's own directory, so the fixture runs a copy of this file
// placed beside a link to that node_modules.
//
// env: CLIENTS_FILE  JSON list of {client_id, client_secret?, token_endpoint_auth_method?, jwks?}
//      RESOURCE      audience of the issued tokens (the protected FHIR base URL)
//      SCOPES        space-separated scopes the server knows (others are silently dropped)
//      TOKEN_TTL     access token lifetime in seconds (default 300)
// Listens on 127.0.0.1 on a free port and prints one line "listening <port>" when ready.
import http from 'node:http';
import fs from 'node:fs';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const RESOURCE = process.env.RESOURCE;
const SCOPES = (process.env.SCOPES || '').split(/\s+/).filter(Boolean);
const TOKEN_TTL = Number(process.env.TOKEN_TTL || 300);
const defs = JSON.parse(fs.readFileSync(process.env.CLIENTS_FILE, 'utf8'));

// The server's own signing key, made fresh at every start.
const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = { ...privateKey.export({ format: 'jwk' }), kid: 'as-1', alg: 'RS256', use: 'sig' };

const clients = defs.map((c) => ({
  client_id: c.client_id,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: c.token_endpoint_auth_method
    || (c.client_secret ? 'client_secret_basic' : 'private_key_jwt'),
  ...(c.client_secret ? { client_secret: c.client_secret } : { jwks: c.jwks }),
  scope: c.scope || SCOPES.join(' '),
}));

// Bind first: the issuer URL names the port.
const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [signingJwk] },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
    enabledJWA: { clientAuthSigningAlgValues: ['RS384', 'ES384', 'RS256', 'ES256'] },
    scopes: ['openid', ...SCOPES],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resourceIndicator) => ({
          scope: SCOPES.join(' '),
          audience: resourceIndicator,
          accessTokenTTL: TOKEN_TTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  provider.on('grant.error', (ctx, err) => console.error('grant.error', err.message, err.error_description || ''));
  const callback = provider.callback();
  server.on('request', (req, res) => {
    if (req.url === '/.well-known/oauth-authorization-server') req.url = '/.well-known/openid-configuration';
    callback(req, res);
  });
  console.log(`listening ${port}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));

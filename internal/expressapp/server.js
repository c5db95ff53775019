'use strict';

// The Express side of redisecho's express-session compatibility tests
// (issue 13): the session setup of the guide's "Configure Express Session
// with Redis" (shared/reference/redis-with-express.md) on current packages
// (express 5, express-session 1.19.0, connect-redis 9.0.0, node-redis 5),
// with the demo users and session fields of redisecho's example app
// (example/routes.go), so that a Go app and this one share logins on one
// Redis.
//
// Environment (every variable optional):
//
//   PORT            TCP port on 127.0.0.1 (default 3000; 0 picks a free one).
//                   "listening <port>" goes to stdout once the app accepts.
//   REDIS_URL       standalone Redis (default redis://127.0.0.1:6379)
//   REDIS_CLUSTER   comma-separated host:port seeds of a Redis Cluster; wins
//                   over REDIS_URL
//   SESSION_SECRET  signing secret; comma-separated for several (an array in
//                   that order: the first signs, every one verifies)
//   SESSION_PREFIX  connect-redis key prefix (default "session:")
//   SESSION_COOKIE  cookie name (default "sessionId")
//   SESSION_TTL     connect-redis ttl in seconds (default 86400, the guide's);
//                   used only for sessions whose cookie has no expiry
//   COOKIE_MAX_AGE  cookie maxAge in ms (default 86400000, the guide's);
//                   "" is the default, "none" makes a browser-session cookie
//   COOKIE_SECURE   "1"/"true" marks the cookie Secure (default false)
//   TRUST_PROXY     "1"/"true": trust X-Forwarded-Proto (for Secure cookies
//                   over plain HTTP in tests)
//   ROLLING         "1"/"true": express-session's rolling option
//   EXIT_ON_STDIN_CLOSE  "1": stop when stdin reaches EOF (a test harness
//                   holds a pipe there, so the app dies with the harness)
//
// Routes answer JSON. Errors answer {"error": message, "status": code}.

const express = require('express');
const session = require('express-session');
const { RedisStore } = require('connect-redis');
const { createClient, createCluster } = require('redis');

const env = process.env;

function flag(name) {
  const v = (env[name] || '').trim().toLowerCase();
  return v === '1' || v === 'true' || v === 'yes' || v === 'on';
}

function fail(msg) {
  process.stderr.write(`expressapp: ${msg}\n`);
  process.exit(1);
}

// The demo users of example/routes.go.
const users = [
  { id: 1, username: 'alice', password: 'wonderland' },
  { id: 2, username: 'bob', password: 'builder' },
];

// ---- Redis client ---------------------------------------------------------

// disableOfflineQueue: while Redis is unreachable, commands fail at once
// (the request answers 500) instead of waiting in node-redis's queue.
let redis;
if (env.REDIS_CLUSTER && env.REDIS_CLUSTER.trim() !== '') {
  const rootNodes = env.REDIS_CLUSTER.split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '')
    .map((addr) => ({ url: addr.includes('://') ? addr : `redis://${addr}` }));
  if (rootNodes.length === 0) fail('REDIS_CLUSTER holds no address');
  redis = createCluster({ rootNodes, defaults: { disableOfflineQueue: true } });
} else {
  redis = createClient({ url: env.REDIS_URL || 'redis://127.0.0.1:6379', disableOfflineQueue: true });
}
redis.on('error', (err) => process.stderr.write(`expressapp: redis error: ${err && err.message}\n`));

// ---- Session --------------------------------------------------------------

let secret = env.SESSION_SECRET === undefined ? 'your-secret-key' : env.SESSION_SECRET;
if (secret.includes(',')) {
  secret = secret.split(',').filter((s) => s !== '');
  if (secret.length === 0) fail('SESSION_SECRET holds no secret');
  if (secret.length === 1) secret = secret[0];
}
if (secret === '') fail('SESSION_SECRET is empty');

const cookieName = env.SESSION_COOKIE || 'sessionId';
const prefix = env.SESSION_PREFIX === undefined ? 'session:' : env.SESSION_PREFIX;

let ttl = 86400; // 24 hours in seconds (the guide's)
if (env.SESSION_TTL !== undefined && env.SESSION_TTL !== '') {
  ttl = Number(env.SESSION_TTL);
  if (!Number.isFinite(ttl)) fail(`SESSION_TTL=${env.SESSION_TTL} is not a number`);
}

let maxAge = 24 * 60 * 60 * 1000; // 24 hours (the guide's)
if (env.COOKIE_MAX_AGE !== undefined && env.COOKIE_MAX_AGE !== '') {
  if (env.COOKIE_MAX_AGE === 'none') {
    maxAge = undefined;
  } else {
    maxAge = Number(env.COOKIE_MAX_AGE);
    if (!Number.isFinite(maxAge)) fail(`COOKIE_MAX_AGE=${env.COOKIE_MAX_AGE} is not a number`);
  }
}

const cookie = {
  secure: flag('COOKIE_SECURE'),
  httpOnly: true,
  maxAge,
  sameSite: 'lax',
};
if (cookie.maxAge === undefined) delete cookie.maxAge;

const redisStore = new RedisStore({ client: redis, prefix, ttl });

const app = express();
app.disable('x-powered-by');
if (flag('TRUST_PROXY')) app.set('trust proxy', true);
app.use(express.json({ strict: false }));
app.use(
  session({
    store: redisStore,
    secret,
    resave: false,
    saveUninitialized: false,
    rolling: flag('ROLLING'),
    name: cookieName,
    cookie,
  }),
);

// Keys that /session/set may not write: the session's own machinery, and
// __proto__ (which JSON.parse makes an own key and Object.assign would treat
// as the prototype).
const reserved = new Set([
  'cookie', 'id', 'req', '__proto__', 'constructor', 'prototype',
  'touch', 'resetMaxAge', 'save', 'reload', 'destroy', 'regenerate',
]);

function httpError(status, message) {
  const err = new Error(message);
  err.status = status;
  return err;
}

function isPlainObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function merge(sess, body) {
  if (!isPlainObject(body)) throw httpError(400, 'Body must be a JSON object');
  for (const k of Object.keys(body)) {
    if (reserved.has(k)) throw httpError(400, `Key ${JSON.stringify(k)} is reserved`);
  }
  for (const k of Object.keys(body)) sess[k] = body[k];
}

// promisify a session method that takes a callback
function call(sess, method) {
  return new Promise((resolve, reject) => sess[method]((err) => (err ? reject(err) : resolve())));
}

function sessionHeaders(req, res) {
  if (typeof req.sessionID === 'string') res.set('X-Session-Id', req.sessionID);
}

// ---- Routes ---------------------------------------------------------------

// The guide's POST /login with example/routes.go's users and fields. The
// password is checked when given; tests may log in by username alone.
app.post('/login', (req, res) => {
  const body = isPlainObject(req.body) ? req.body : {};
  const user = users.find((u) => u.username === body.username);
  if (!user) {
    return res.status(400).json({ error: 'Unknown user', status: 400 });
  }
  if (body.password !== undefined && body.password !== user.password) {
    return res.status(401).json({ error: 'Invalid credentials', status: 401 });
  }
  req.session.userId = user.id;
  req.session.username = user.username;
  req.session.isAuthenticated = true;
  sessionHeaders(req, res);
  res.json({ message: 'Login successful' });
});

app.get('/profile', (req, res) => {
  if (!req.session || !req.session.isAuthenticated) {
    return res.status(401).json({ error: 'Not authenticated', status: 401 });
  }
  sessionHeaders(req, res);
  res.json({ userId: req.session.userId, username: req.session.username });
});

app.post('/logout', async (req, res) => {
  if (req.session) await call(req.session, 'destroy');
  res.clearCookie(cookieName);
  res.json({ message: 'Logged out' });
});

// ---- Test-only routes -----------------------------------------------------

// Merges a JSON object into the session (any JSON values, nested).
// ?delay=<ms> waits that long first: the session was loaded when the
// request came in, so the tests can show what a whole-blob write of a
// request in flight does.
app.post('/session/set', async (req, res) => {
  const delay = Number(req.query.delay || 0);
  if (delay > 0) await new Promise((resolve) => setTimeout(resolve, Math.min(delay, 10000)));
  merge(req.session, req.body);
  sessionHeaders(req, res);
  res.json(req.session);
});

// The whole session as the store would serialize it, cookie included.
app.get('/session/dump', (req, res) => {
  sessionHeaders(req, res);
  res.json(req.session);
});

// touch() resets the cookie's expiry to now + originalMaxAge; the explicit
// save() writes the session (new expires, new TTL) even though its data is
// unchanged, which resave: false alone would not do.
app.post('/session/touch', async (req, res) => {
  req.session.touch();
  await call(req.session, 'save');
  sessionHeaders(req, res);
  res.json(req.session);
});

// Destroys the session and starts a new one (new ID, new cookie); a JSON
// object body, if any, is merged into the new session.
app.post('/session/regenerate', async (req, res) => {
  const body = req.body;
  if (body !== undefined && !isPlainObject(body)) throw httpError(400, 'Body must be a JSON object');
  await call(req.session, 'regenerate');
  if (body !== undefined) merge(req.session, body);
  sessionHeaders(req, res);
  res.json(req.session);
});

// Reloads the session from the store.
app.post('/session/reload', async (req, res) => {
  try {
    await call(req.session, 'reload');
  } catch (err) {
    if (err && err.message === 'failed to load session') throw httpError(404, 'No stored session');
    throw err;
  }
  sessionHeaders(req, res);
  res.json(req.session);
});

app.use((req, res) => {
  res.status(404).json({ error: 'Not found', status: 404 });
});

// eslint-disable-next-line no-unused-vars
app.use((err, req, res, next) => {
  let status = Number(err && (err.status || err.statusCode)) || 500;
  if (status < 400 || status > 599) status = 500;
  const message = (err && err.message) || 'Internal error';
  if (status >= 500) process.stderr.write(`expressapp: ${req.method} ${req.originalUrl}: ${err && err.stack}\n`);
  if (res.headersSent) {
    res.end();
    return;
  }
  res.status(status).json({ error: message, status });
});

// ---- Start and stop -------------------------------------------------------

let server;
let stopping = false;

async function stop() {
  if (stopping) return;
  stopping = true;
  const force = setTimeout(() => process.exit(0), 2000);
  force.unref();
  if (server) {
    await new Promise((resolve) => {
      server.close(() => resolve());
      if (server.closeIdleConnections) server.closeIdleConnections();
    });
  }
  try {
    await redis.close();
  } catch (_) {
    try { redis.destroy(); } catch (_) { /* ignore */ }
  }
  process.exit(0);
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (flag('EXIT_ON_STDIN_CLOSE')) {
  process.stdin.on('end', stop);
  process.stdin.on('close', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
process.on('unhandledRejection', (err) => {
  process.stderr.write(`expressapp: unhandled rejection: ${err && err.stack}\n`);
});

(async () => {
  try {
    await redis.connect();
  } catch (err) {
    fail(`cannot connect to Redis: ${err && err.message}`);
  }
  const port = env.PORT === undefined || env.PORT === '' ? 3000 : Number(env.PORT);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`PORT=${env.PORT} is not a port`);
  server = app.listen(port, '127.0.0.1', (err) => {
    if (err) fail(`cannot listen: ${err.message}`);
    process.stdout.write(`listening ${server.address().port}\n`);
  });
  server.on('error', (err) => fail(`server error: ${err.message}`));
})();

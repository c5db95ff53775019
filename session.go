package redisecho

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/sessions"
	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/redis/rueidis"
)

// Session defaults.
const (
	// DefaultSessionCookie is the cookie name when SessionConfig.CookieName
	// is empty (the guide's "sessionId").
	DefaultSessionCookie = "sessionId"
	// DefaultSessionLifetime is the absolute lifetime of a session (the
	// guide's 24 hours).
	DefaultSessionLifetime = 24 * time.Hour
	// DefaultSessionIdleTimeout ends a session nobody used for this long.
	DefaultSessionIdleTimeout = 2 * time.Hour
	// DefaultSessionTouchAfter is the share of the idle timeout that must
	// pass before a read-only request extends it.
	DefaultSessionTouchAfter = 0.25
	// DefaultSessionMaxSize bounds the encoded size of a session's values.
	DefaultSessionMaxSize = 64 << 10
	// DefaultAnonymousIdleTimeout ends a session bound to no user after this
	// long unused (capped at IdleTimeout): the usual length of a web visit,
	// so a visitor who comes back within it keeps a cart or a preference,
	// while sessions that crawlers and floods create leave Redis 4× sooner
	// than a logged-in user's.
	DefaultAnonymousIdleTimeout = 30 * time.Minute
	// DefaultAnonymousMaxSize bounds the values of a session bound to no user
	// (capped at MaxSize): a cookie's worth (4 KiB), which holds preferences,
	// a CSRF token or a small cart, and makes an anonymous flood cost Redis
	// 16× less per session than the 64 KiB a logged-in user may keep.
	DefaultAnonymousMaxSize = 4 << 10
	// MaxUserIDLength bounds a user ID given to SetUserID, in bytes: it is
	// stored in the session and names the user's index.
	MaxUserIDLength = 256
)

// Session configuration and usage errors.
var (
	// ErrNoSessionKeys is returned when SessionConfig.Keys is empty.
	ErrNoSessionKeys = errors.New("redisecho: session: at least one signing key is required")
	// ErrWeakSessionKey is returned for a signing key shorter than 32 bytes.
	ErrWeakSessionKey = errors.New("redisecho: session: signing keys must be at least 32 bytes")
	// ErrInvalidSessionConfig is returned for out-of-range session options.
	ErrInvalidSessionConfig = errors.New("redisecho: session: invalid configuration")
	// ErrNoSessionMiddleware is returned by GetSession when the Session
	// middleware did not run for the request.
	ErrNoSessionMiddleware = errors.New("redisecho: session: the Session middleware is not installed on this route")
	// ErrSessionTooLarge is matched (errors.Is) by the error Set returns when
	// the session's values would exceed MaxSize: an *echo.HTTPError 413 that
	// a handler can return as is. The session is left as it was.
	ErrSessionTooLarge = errors.New("redisecho: session: too large")
	// ErrInvalidSessionKey is returned by Set for an empty key or one longer
	// than 256 bytes.
	ErrInvalidSessionKey = errors.New("redisecho: session: invalid value key")
	// ErrSessionCommitted is returned by changes made after the response
	// started: they could no longer be saved before the client sees the
	// response, so they are refused.
	ErrSessionCommitted = errors.New("redisecho: session: response already started")
	// ErrSessionUnavailable is what Err returns when the session could not
	// be read from Redis; the request is answered 503.
	ErrSessionUnavailable = errors.New("redisecho: session: store unavailable")
	// ErrInvalidUserID is returned by SetUserID, ListUserSessions and
	// DestroyUserSessions for a user ID longer than MaxUserIDLength (and by
	// the last two for an empty one).
	ErrInvalidUserID = errors.New("redisecho: session: invalid user ID")
	// ErrSessionIndexMissing is returned by DestroyUserSessions when one of
	// the sessions it was told to keep is bound to the user but missing from
	// the user's index: the index was evicted or deleted, so other sessions
	// of the user may live on that the call could not find. It returns how
	// many it ended all the same. The index carries a TTL like the sessions:
	// give the sessions' Redis a policy that never evicts them (see the
	// README's operational notes).
	ErrSessionIndexMissing = errors.New("redisecho: session: the user's session index is missing")
)

// SessionConfig configures the Session middleware and its SessionStore.
type SessionConfig struct {
	// Client is the rueidis client. Required.
	Client rueidis.Client
	// Options is the shared plumbing: Prefix, Timeout, Breaker, Clock and
	// Logger, with their defaults.
	Options
	// Skipper skips the middleware for a request. Default: never skip.
	Skipper middleware.Skipper
	// Keys is the HMAC-SHA256 key ring that signs cookies, newest first: the
	// first key signs, every key verifies, so keys rotate without logging
	// anyone out. Each key must be at least 32 bytes. Required.
	Keys []string
	// CookieName is the session cookie's name. Default: "sessionId".
	CookieName string
	// CookiePath is the cookie's Path. Default: "/".
	CookiePath string
	// CookieDomain is the cookie's Domain. Default: none (host-only).
	CookieDomain string
	// InsecureCookie drops the Secure attribute, for local development over
	// plain HTTP only. Default: false (cookies are Secure).
	InsecureCookie bool
	// SameSite is the cookie's SameSite mode. Default: http.SameSiteLaxMode.
	SameSite http.SameSite
	// Lifetime is the absolute lifetime of a session, enforced by the
	// server; a remembered session's cookie gets it as Max-Age. Regenerate
	// keeps it: it does not restart. Default: 24 h.
	Lifetime time.Duration
	// IdleTimeout ends a session nobody used for this long, enforced by the
	// server. It slides, but only once TouchAfter of it has passed, so the
	// effective timeout is between (1-TouchAfter)×IdleTimeout and IdleTimeout
	// after the last request. Default: 2 h.
	IdleTimeout time.Duration
	// TouchAfter is the share of IdleTimeout that must pass before a request
	// that changes nothing extends the session, so that read-only requests
	// usually write nothing. Between 0 (exclusive) and 1. Default: 0.25.
	TouchAfter float64
	// MaxSize bounds what a session's values and flashes take, in bytes:
	// each counts its encoded size, its key and SessionValueOverhead (32
	// bytes, about what Redis spends per hash field), so that many tiny
	// values cannot hold more Redis memory than the bound says.
	// Default: 64 KiB.
	MaxSize int
	// AnonymousIdleTimeout replaces IdleTimeout for sessions bound to no
	// user (SetUserID never called, or called with ""), enforced by the
	// server like IdleTimeout. Binding a user switches the session to
	// IdleTimeout, unbinding switches it back, from that save on. At most
	// IdleTimeout. The GorillaStore, which has no user binding, keeps its
	// sessions on IdleTimeout. Default: 30 min, or IdleTimeout if shorter.
	AnonymousIdleTimeout time.Duration
	// AnonymousMaxSize replaces MaxSize for sessions bound to no user,
	// enforced by the save script: a save that would grow such a session
	// beyond it is refused with 413 (a session unbound while it holds more
	// is kept, and may shrink). At most MaxSize. The GorillaStore keeps its
	// sessions on MaxSize. Default: 4 KiB, or MaxSize if smaller.
	AnonymousMaxSize int
	// AllowSharedCaching leaves the caching headers of responses alone. By
	// default a response whose handler read a session bound to a user gets
	// "Cache-Control: private" (unless the handler set a Cache-Control) and
	// "Vary: Cookie" (added to any other Vary), before its headers go out,
	// so that no shared cache in front of the app (a CDN, a proxy, the
	// response cache) stores one user's page for others. Default: false
	// (personal responses are marked private).
	AllowSharedCaching bool
	// Codec encodes values. Default: JSONCodec.
	Codec Codec
	// BrowserSessionCookie makes new sessions use a browser-session cookie
	// (no Max-Age: it ends when the browser closes) instead of a persistent
	// one whose Max-Age is the remaining Lifetime. Change it per session with
	// Session.SetRememberMe. Default: false (persistent, as in the guide).
	BrowserSessionCookie bool
	// RecordUserAgent stores the User-Agent (first 256 bytes) of the
	// request that created the session, for ListUserSessions. Default: false.
	RecordUserAgent bool
	// Degrade runs handlers with an empty session that is never saved when
	// Redis is down or the breaker is open, instead of answering 503.
	// Default: false (503 with {"error":"session store unavailable"}).
	Degrade bool
}

// Session returns the session middleware for client with the defaults of
// SessionConfig, signing cookies with keys (newest first). It panics when
// the configuration is invalid (no key, a key shorter than 32 bytes).
func Session(client rueidis.Client, keys ...string) echo.MiddlewareFunc {
	return SessionWithConfig(SessionConfig{Client: client, Keys: keys})
}

// SessionWithConfig returns the session middleware for cfg. It panics when
// cfg is invalid; use ToMiddleware to get the error instead.
func SessionWithConfig(cfg SessionConfig) echo.MiddlewareFunc {
	return must(cfg.ToMiddleware())
}

// ToMiddleware validates cfg, fills its defaults and returns the middleware.
// It does no I/O.
func (cfg SessionConfig) ToMiddleware() (echo.MiddlewareFunc, error) {
	st, err := NewSessionStore(cfg)
	if err != nil {
		return nil, err
	}
	return st.Middleware(), nil
}

// SessionStore is the Redis side of sessions: one hash per session, saved
// field by field. The middleware and the gorilla adapter use it; use it
// directly for ListUserSessions and DestroyUserSessions. Build it with
// NewSessionStore; it is safe for concurrent use.
//
// Keys, with S the session's slot tag (kept across regeneration) and D the
// SHA-256 of its token (the token itself is never stored):
//
//	<prefix>{sess:S}:D          hash: "v:<key>" values, "f:<key>" flashes, "_…" metadata
//	<prefix>{user:U}:sessions   sorted set: handles of user U's sessions, scored by expiry (ms)
type SessionStore struct {
	b    *backend
	cfg  SessionConfig
	keys [][]byte

	loads, cacheHits, saves, saveErrors, staleBypass atomic.Uint64

	verified  atomic.Pointer[sync.Map] // cookie value -> *verifiedCookie
	verifiedN atomic.Int64

	gone  sync.Map // session key -> unix nanos: destroyed or renamed here
	goneN atomic.Int64

	x *expressMode // Express mode (NewExpressSessionStore), else nil
}

// NewSessionStore validates cfg, fills its defaults and returns the store.
// It does no I/O.
func NewSessionStore(cfg SessionConfig) (*SessionStore, error) {
	b, err := newBackend("session", cfg.Client, cfg.Options)
	if err != nil {
		return nil, err
	}
	if len(cfg.Keys) == 0 {
		return nil, ErrNoSessionKeys
	}
	keys := make([][]byte, len(cfg.Keys))
	for i, k := range cfg.Keys {
		if len(k) < 32 {
			return nil, fmt.Errorf("%w: key %d has %d bytes", ErrWeakSessionKey, i, len(k))
		}
		keys[i] = []byte(k)
	}
	if cfg.CookieName == "" {
		cfg.CookieName = DefaultSessionCookie
	}
	if !validCookieName(cfg.CookieName) {
		return nil, fmt.Errorf("%w: cookie name %q", ErrInvalidSessionConfig, cfg.CookieName)
	}
	if cfg.CookiePath == "" {
		cfg.CookiePath = "/"
	}
	if err := checkCookiePrefix(cfg); err != nil {
		return nil, err
	}
	if cfg.SameSite == 0 {
		cfg.SameSite = http.SameSiteLaxMode
	}
	if cfg.Lifetime == 0 {
		cfg.Lifetime = DefaultSessionLifetime
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = DefaultSessionIdleTimeout
	}
	if cfg.TouchAfter == 0 {
		cfg.TouchAfter = DefaultSessionTouchAfter
	}
	if cfg.MaxSize == 0 {
		cfg.MaxSize = DefaultSessionMaxSize
	}
	if cfg.AnonymousIdleTimeout == 0 {
		cfg.AnonymousIdleTimeout = min(DefaultAnonymousIdleTimeout, cfg.IdleTimeout)
	}
	if cfg.AnonymousMaxSize == 0 {
		cfg.AnonymousMaxSize = min(DefaultAnonymousMaxSize, max(cfg.MaxSize, 0))
	}
	switch {
	case cfg.Lifetime < time.Second, cfg.IdleTimeout < time.Second, cfg.AnonymousIdleTimeout < time.Second:
		return nil, fmt.Errorf("%w: Lifetime, IdleTimeout and AnonymousIdleTimeout must be at least 1 s", ErrInvalidSessionConfig)
	case cfg.AnonymousIdleTimeout > cfg.IdleTimeout:
		return nil, fmt.Errorf("%w: AnonymousIdleTimeout %v exceeds IdleTimeout %v", ErrInvalidSessionConfig, cfg.AnonymousIdleTimeout, cfg.IdleTimeout)
	case cfg.TouchAfter <= 0 || cfg.TouchAfter >= 1:
		return nil, fmt.Errorf("%w: TouchAfter %v is not in (0, 1)", ErrInvalidSessionConfig, cfg.TouchAfter)
	case cfg.MaxSize < 0, cfg.AnonymousMaxSize < 0:
		return nil, fmt.Errorf("%w: MaxSize %d, AnonymousMaxSize %d", ErrInvalidSessionConfig, cfg.MaxSize, cfg.AnonymousMaxSize)
	case cfg.AnonymousMaxSize > cfg.MaxSize:
		return nil, fmt.Errorf("%w: AnonymousMaxSize %d exceeds MaxSize %d", ErrInvalidSessionConfig, cfg.AnonymousMaxSize, cfg.MaxSize)
	}
	if cfg.Codec == nil {
		cfg.Codec = JSONCodec{}
	}
	if cfg.Skipper == nil {
		cfg.Skipper = middleware.DefaultSkipper
	}
	return &SessionStore{b: b, cfg: cfg, keys: keys}, nil
}

// checkCookiePrefix refuses a cookie name whose prefix browsers enforce
// (compared without case, as RFC 6265bis does) with options that would make
// every browser drop the cookie: "__Secure-" needs Secure, "__Host-" needs
// Secure, Path=/ and no Domain.
func checkCookiePrefix(cfg SessionConfig) error {
	name := strings.ToLower(cfg.CookieName)
	switch {
	case strings.HasPrefix(name, "__host-") && (cfg.InsecureCookie || cfg.CookiePath != "/" || cfg.CookieDomain != ""):
		return fmt.Errorf("%w: a __Host- cookie needs Secure (no InsecureCookie), CookiePath \"/\" and no CookieDomain", ErrInvalidSessionConfig)
	case strings.HasPrefix(name, "__secure-") && cfg.InsecureCookie:
		return fmt.Errorf("%w: a __Secure- cookie needs Secure (no InsecureCookie)", ErrInvalidSessionConfig)
	}
	return nil
}

func validCookieName(name string) bool {
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte("()<>@,;:\\\"/[]?={}", c) >= 0 {
			return false
		}
	}
	return name != ""
}

// SessionStats counts what a SessionStore did since it was created.
type SessionStats struct {
	// Loads counts session reads.
	Loads uint64
	// CacheHits counts reads served from client-side caching, with no
	// Redis round trip.
	CacheHits uint64
	// StaleBypasses counts reads whose cached copy was older than the
	// client's cookie, and that went to Redis (read-your-writes).
	StaleBypasses uint64
	// Saves counts successful saves.
	Saves uint64
	// SaveErrors counts saves that failed.
	SaveErrors uint64
}

// Stats returns the store's counters.
func (st *SessionStore) Stats() SessionStats {
	return SessionStats{
		Loads: st.loads.Load(), CacheHits: st.cacheHits.Load(), StaleBypasses: st.staleBypass.Load(),
		Saves: st.saves.Load(), SaveErrors: st.saveErrors.Load(),
	}
}

// A token is a session's secret: a slot tag that survives regeneration, so
// that old and new keys share a slot, and 256 random bits.
type token struct {
	tag    string // 4 base64url characters (24 random bits)
	secret string // 43 base64url characters (256 random bits)
}

func newToken(tag string) token {
	var b [35]byte
	_, _ = rand.Read(b[:]) // crypto/rand never fails on supported platforms
	if tag == "" {
		tag = base64.RawURLEncoding.EncodeToString(b[32:])
	}
	return token{tag: tag, secret: base64.RawURLEncoding.EncodeToString(b[:32])}
}

// handle is the opaque, non-secret name of a session in its user's index: it
// locates the session key but is not a credential.
func (t token) handle() string { return t.tag + "." + Digest(t.secret) }

func (st *SessionStore) keyOf(handle string) (string, bool) {
	tag, digest, ok := strings.Cut(handle, ".")
	if !ok || len(tag) != 4 || len(digest) != 43 {
		return "", false
	}
	return st.b.keys.Group("sess", tag).Key(digest), true
}

func (st *SessionStore) key(t token) string {
	return st.b.keys.Group("sess", t.tag).Key(Digest(t.secret))
}

func (st *SessionStore) userKey(userID string) string {
	return st.b.keys.Group("user", userID).Key("sessions")
}

// The cookie value is "<tag>.<secret>.<version>.<mac>": the version is the
// session version the client last saw (for read-your-writes), and mac is the
// first 128 bits of HMAC-SHA256 over the cookie name and the rest, under the
// newest key.
func (st *SessionStore) encodeCookie(name string, t token, version int64) string {
	payload := t.tag + "." + t.secret + "." + strconv.FormatInt(version, 10)
	return payload + "." + st.mac(st.keys[0], name, payload)
}

// mac binds the cookie's name, so a cookie issued under one name is refused
// under another.
func (st *SessionStore) mac(key []byte, name, payload string) string {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(name))
	h.Write([]byte{0})
	h.Write([]byte(payload))
	var sum [sha256.Size]byte
	return base64.RawURLEncoding.EncodeToString(h.Sum(sum[:0])[:16])
}

// decodeCookie verifies a cookie value. rotated reports that a key other
// than the newest signed it, so the cookie should be re-signed.
func (st *SessionStore) decodeCookie(name, v string) (t token, version int64, rotated, ok bool) {
	if len(v) < 4+1+43+1+1+1+22 || len(v) > 4+1+43+1+19+1+22 {
		return token{}, 0, false, false
	}
	i := strings.LastIndexByte(v, '.')
	if i < 0 {
		return token{}, 0, false, false
	}
	payload, mac := v[:i], v[i+1:]
	parts := strings.Split(payload, ".")
	if len(parts) != 3 || len(parts[0]) != 4 || len(parts[1]) != 43 || len(mac) != 22 {
		return token{}, 0, false, false
	}
	for k, key := range st.keys {
		if subtle.ConstantTimeCompare([]byte(st.mac(key, name, payload)), []byte(mac)) == 1 {
			version, err := strconv.ParseInt(parts[2], 10, 64)
			if err != nil || version < 0 {
				return token{}, 0, false, false
			}
			return token{tag: parts[0], secret: parts[1]}, version, k > 0, true
		}
	}
	return token{}, 0, false, false
}

// goneWindow is how long this instance distrusts its local cache for a
// session it destroyed or renamed: longer than Redis's invalidation takes to
// arrive (measured: a few milliseconds at worst on loopback).
const goneWindow = 2 * time.Second

// markGone records that this instance destroyed or renamed the session at
// key, so that reads of it skip the local cache until the invalidation has
// surely arrived: a destroyed session never works after the call returns.
func (st *SessionStore) markGone(key string) {
	now := time.Now().UnixNano()
	st.gone.Store(key, now)
	if st.goneN.Add(1)%1024 == 0 { // keep it bounded: drop expired marks
		st.gone.Range(func(k, v any) bool {
			if now-v.(int64) >= int64(goneWindow) {
				st.gone.CompareAndDelete(k, v)
			}
			return true
		})
	}
}

func (st *SessionStore) recentlyGone(key string) bool {
	v, ok := st.gone.Load(key)
	if !ok {
		return false
	}
	if time.Now().UnixNano()-v.(int64) < int64(goneWindow) {
		return true
	}
	st.gone.CompareAndDelete(key, v)
	return false
}

// verifiedCookie is a cookie value whose signature checked out, with what
// it says.
type verifiedCookie struct {
	tok     token
	key     string
	version int64
	rotated bool
	hgetall rueidis.Cacheable // prebuilt and pinned: shared by every read
}

// maxVerifiedCookies bounds the verified-cookie memo; it is emptied when
// full.
const maxVerifiedCookies = 1 << 14

// verify checks a cookie value, remembering the values that checked out, so
// that a returning client costs a map lookup instead of an HMAC and a
// SHA-256. The memo is keyed by the whole value: a value that differs in any
// byte is checked again. It returns nil for a bad cookie.
func (st *SessionStore) verify(v string) *verifiedCookie {
	m := st.verified.Load()
	if m != nil {
		if e, ok := m.Load(v); ok {
			return e.(*verifiedCookie)
		}
	}
	t, version, rotated, ok := st.decodeCookie(st.cfg.CookieName, v)
	if !ok {
		return nil
	}
	vc := &verifiedCookie{tok: t, key: st.key(t), version: version, rotated: rotated}
	vc.hgetall = st.b.client.B().Hgetall().Key(vc.key).Cache().Pin()
	if m == nil || st.verifiedN.Add(1) > maxVerifiedCookies {
		m = new(sync.Map)
		st.verified.Store(m)
		st.verifiedN.Store(0)
	}
	m.Store(v, vc)
	return vc
}

// Metadata fields of the session hash. Values live under "v:", flashes under
// "f:", so user keys never clash with these.
const (
	fVersion  = "_v"  // incremented by every save that changes data
	fCreated  = "_c"  // creation, unix ms
	fAbsolute = "_a"  // absolute expiry, unix ms
	fSeen     = "_s"  // last extension of the idle timeout, unix ms
	fUser     = "_u"  // bound user ID
	fAgent    = "_ua" // User-Agent at creation
	fRemember = "_r"  // "1": persistent cookie
	fSize     = "_z"  // encoded size of "v:" and "f:" fields
	fIdle     = "_i"  // idle timeout the last save applied, ms (absent: IdleTimeout)
)

// saveScript applies one save atomically.
//
// KEYS[1] the session's current key; KEYS[2] the key to save under (differs
// from KEYS[1] when regenerating; both share the slot tag).
// ARGV[1] "new" (create; fails if KEYS[2] exists), "update" (the session
// must exist and be unexpired) or "destroy"; ARGV[2] now (unix ms);
// ARGV[3] idle timeout of a session bound to a user (ms); ARGV[4] absolute
// expiry (ms, "new" only; for "destroy", the user the session must be bound
// to, or "" for any); ARGV[5] max size of a bound session's values (bytes);
// ARGV[6] "1" to increment the version; ARGV[7] and ARGV[8] the idle timeout
// and max size of a session bound to no user (the GorillaStore passes
// ARGV[3] and ARGV[5] again); ARGV[9] n, the number of field/value pairs
// that follow and are set; ARGV[10] "1" to delete every value and flash the
// session holds that this save does not set ("update" only: Clear, which
// must also drop what other requests saved since this one read the
// session); the remaining ARGV are fields to delete.
//
// The limits follow the binding the save leaves ("_u", set in this save or
// stored): the idle timeout applied is stored in "_i", so that the next
// save, and reads, check the one the session lives under. An unbound
// session may not grow beyond its max size; one unbound while it held more
// is kept.
//
// "destroy" on a key that holds no session leaves a 60 s marker there, so
// that a save already in flight cannot create the session afterwards.
//
// Full Redis (maxmemory, noeviction). Redis 7.0 refuses a write in a script
// only when it is a deny-oom command and the script's first write; after a
// first write that is not deny-oom (DEL, RENAME, HDEL, PEXPIRE) the script
// writes on into a full Redis. So a save's first write is its HSET, which
// refuses (with the OOM error, nothing written) or lets the whole save
// through; the writes that free memory (DEL of a destroyed or expired
// session) still succeed. The destroy marker is written with pcall: a full
// Redis refuses it ("unmarked"), and DestroyUserSessions then keeps the
// index entry, so that a login in flight that lands once memory is freed
// stays findable.
//
// It returns {version, absolute expiry, remember, previous user} ("destroy":
// {0, 0, "deleted"|"kept"|"missing"|"unmarked", user}, "unmarked" for a
// missing session whose marker a full Redis refused), or an integer: -1 the session
// is gone (expired, destroyed, unknown), -2 the new key exists (a token
// collision), -3 the values would exceed the max size. Sizes of "v:"/"f:"
// fields are kept in _z, so the size check costs O(fields changed) (a
// Clear adds an HKEYS). An update that changes one value makes 5 calls: HMGET, HSTRLEN, HSET,
// PEXPIRE, and the EVALSHA itself.
var saveScript = rueidis.NewLuaScript(strings.ReplaceAll(`
local src, dst = KEYS[1], KEYS[2]
local mode, now = ARGV[1], tonumber(ARGV[2])
local meta = redis.call('HMGET', src, '_a', '_s', '_z', '_u', '_r', '_v', '_i')
if mode == 'destroy' then
  if not meta[1] then
    if type(redis.pcall('HSET', src, '_d', '1')) ~= 'number' then
      return {0, 0, 'unmarked', ''} -- a full Redis: no marker
    end
    redis.call('PEXPIRE', src, 60000)
    return {0, 0, 'missing', ''}
  end
  local u = meta[4] or ''
  if ARGV[4] == '' or u == ARGV[4] then
    redis.call('DEL', src)
    return {0, 0, 'deleted', u}
  end
  return {0, 0, 'kept', u}
end
local idle, maxsize, aidle, amax = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[7]), tonumber(ARGV[8])
local abs, size, prev, rem, ver
if mode == 'new' then
  if redis.call('EXISTS', dst) == 1 then return -2 end
  abs, size, prev, rem, ver = tonumber(ARGV[4]), 0, '', '', 0
else
  abs = tonumber(meta[1])
  local seen = tonumber(meta[2])
  if not abs or abs <= now or (seen and now - seen > (tonumber(meta[7]) or idle)) then
    redis.call('DEL', src)
    return -1
  end
  size, prev, rem, ver = tonumber(meta[3] or '0'), meta[4] or '', meta[5] or '', tonumber(meta[6] or '0')
end
local before, user = size, prev
local fields = {'_s', ARGV[2]}
if mode == 'new' then
  table.insert(fields, '_c'); table.insert(fields, ARGV[2])
  table.insert(fields, '_a'); table.insert(fields, ARGV[4])
end
local n = tonumber(ARGV[9])
local ovh = SESSION_VALUE_OVERHEAD
local clear = ARGV[10] == '1' and mode ~= 'new'
if clear then size = 0 end
local i = 11
for _ = 1, n do
  local f, v = ARGV[i], ARGV[i + 1]
  local c = string.sub(f, 1, 2)
  if c == 'v:' or c == 'f:' then
    size = size + #f + #v + ovh
    if mode ~= 'new' and not clear then
      local old = redis.call('HSTRLEN', src, f)
      if old > 0 then size = size - old - #f - ovh end
    end
  elseif f == '_r' then
    rem = v
  elseif f == '_u' then
    user = v
  end
  table.insert(fields, f); table.insert(fields, v)
  i = i + 2
end
for j = i, #ARGV do
  local c = string.sub(ARGV[j], 1, 2)
  if mode ~= 'new' and not clear and (c == 'v:' or c == 'f:') then
    local old = redis.call('HSTRLEN', src, ARGV[j])
    if old > 0 then size = size - old - #ARGV[j] - ovh end
  end
end
if size < 0 then size = 0 end -- a _z written before keys counted
local drop = {}
for j = i, #ARGV do drop[#drop + 1] = ARGV[j] end
if clear then
  local keep = {}
  for j = 11, i - 1, 2 do keep[ARGV[j]] = true end
  for _, f in ipairs(redis.call('HKEYS', src)) do
    local c = string.sub(f, 1, 2)
    if (c == 'v:' or c == 'f:') and not keep[f] then drop[#drop + 1] = f end
  end
end
local limit = idle
if user == '' then
  limit = aidle
  if size > amax and size > before then return -3 end
end
if size > maxsize then return -3 end
if dst ~= src and redis.call('EXISTS', dst) == 1 then return -2 end
if ARGV[6] == '1' then ver = ver + 1 end
table.insert(fields, '_v'); table.insert(fields, ver)
table.insert(fields, '_z'); table.insert(fields, size)
table.insert(fields, '_i'); table.insert(fields, limit)
-- In chunks: unpack is limited to a few thousand values. The first HSET is
-- the first write (see Full Redis above).
for j = 1, #fields, 1000 do
  redis.call('HSET', src, unpack(fields, j, math.min(j + 999, #fields)))
end
for j = 1, #drop, 1000 do
  redis.call('HDEL', src, unpack(drop, j, math.min(j + 999, #drop)))
end
if dst ~= src then redis.call('RENAME', src, dst) end
redis.call('PEXPIRE', dst, math.min(limit, abs - now))
return {ver, abs, rem, prev}
`, "SESSION_VALUE_OVERHEAD", strconv.Itoa(SessionValueOverhead)))

// indexScript records a session in its user's index and prunes entries
// whose absolute expiry passed.
//
// KEYS[1] the user's index. ARGV[1] now (unix ms); ARGV[2] the handle;
// ARGV[3] its absolute expiry (unix ms). The index expires with its last
// session. Its first write is ZADD (deny-oom), so a full Redis refuses the
// whole script (see saveScript).
var indexScript = rueidis.NewLuaScript(`
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[1], last[2]) end
return 1
`)

// sessionData is what a load returns. Times are unix milliseconds.
type sessionData struct {
	fields   map[string]string
	version  int64
	absolute int64
	seen     int64
	idle     int64 // the idle timeout the session lives under, ms
	loadedAt int64 // the clock when it was read

	// Express mode: the stored JSON, its top-level members, and the
	// key's PTTL (ms) when read.
	blob    []byte
	members []jsonMember
	pttl    int64

	cached bool // served by client-side caching, with no round trip
}

// touchDue reports whether TouchAfter of the session's idle timeout passed
// since it was last extended.
func (st *SessionStore) touchDue(d sessionData) bool {
	return float64(d.loadedAt-d.seen) >= float64(d.idle)*st.cfg.TouchAfter
}

// load reads a session. A cached copy older than minVersion (the version in
// the client's cookie) is bypassed, so a client always sees its own writes;
// so is a cached copy that looks expired, since an extension this instance
// just wrote may not have invalidated it yet. found is false for a session
// that does not exist or has expired.
func (st *SessionStore) load(ctx context.Context, t token, minVersion int64) (d sessionData, found bool, err error) {
	key := st.key(t)
	return st.loadKey(ctx, key, st.b.client.B().Hgetall().Key(key).Cache().Pin(), minVersion)
}

// loadKey is load for the session stored at key, read with cmd (its
// HGETALL, possibly prebuilt).
func (st *SessionStore) loadKey(ctx context.Context, key string, cmd rueidis.Cacheable, minVersion int64) (d sessionData, found bool, err error) {
	st.loads.Add(1)
	res := st.b.DoCache(ctx, key, cmd, st.cfg.IdleTimeout)
	m, err := res.AsStrMap()
	if err != nil {
		return d, false, err
	}
	d, found = st.parse(m)
	if res.IsCacheHit() {
		if d.version < minVersion || !found || (found && st.recentlyGone(key)) {
			st.staleBypass.Add(1)
			st.b.observe(Observation{Kind: ObsSessionStaleBypass, N: 1})
			if m, err = st.b.Do(ctx, key, st.b.client.B().Hgetall().Key(key).Build()).AsStrMap(); err != nil {
				return d, false, err
			}
			d, found = st.parse(m)
		} else {
			st.cacheHits.Add(1)
			d.cached = true // (a hit that is not bypassed found the session)
		}
	}
	return d, found, nil
}

// parse reads a session hash; found is false when it is empty or expired.
func (st *SessionStore) parse(m map[string]string) (d sessionData, found bool) {
	if len(m) == 0 {
		return d, false
	}
	d.fields = m
	d.version, _ = strconv.ParseInt(m[fVersion], 10, 64)
	d.absolute, _ = strconv.ParseInt(m[fAbsolute], 10, 64)
	d.seen, _ = strconv.ParseInt(m[fSeen], 10, 64)
	d.idle, _ = strconv.ParseInt(m[fIdle], 10, 64)
	if d.idle <= 0 {
		d.idle = st.cfg.IdleTimeout.Milliseconds() // saved before "_i" existed
	}
	d.loadedAt = st.b.clock.Now().UnixMilli()
	return d, d.loadedAt < d.absolute && d.loadedAt-d.seen <= d.idle
}

// errSessionGone, errSessionCollision and ErrSessionTooLarge are the script's
// refusals.
var (
	errSessionGone      = errors.New("redisecho: session: gone")
	errSessionCollision = errors.New("redisecho: session: token collision")
)

type saveResult struct {
	version  int64
	absolute time.Time
	remember bool
	prevUser string
	state    string // "destroy" only: deleted, kept, missing or unmarked
}

func (st *SessionStore) runSave(ctx context.Context, src, dst string, args []string) (saveResult, error) {
	res := st.b.Exec(ctx, saveScript, []string{src, dst}, args)
	if n, err := res.AsInt64(); err == nil {
		switch n {
		case -1:
			return saveResult{}, errSessionGone
		case -2:
			return saveResult{}, errSessionCollision
		case -3:
			return saveResult{}, ErrSessionTooLarge
		}
	}
	arr, err := res.ToArray()
	if err != nil {
		return saveResult{}, err
	}
	if len(arr) != 4 {
		return saveResult{}, fmt.Errorf("redisecho: session: unexpected save reply of %d elements", len(arr))
	}
	v, _ := arr[0].AsInt64()
	abs, _ := arr[1].AsInt64()
	rem, _ := arr[2].ToString()
	prev, _ := arr[3].ToString()
	return saveResult{version: v, absolute: time.UnixMilli(abs), remember: rem == "1", prevUser: prev, state: rem}, nil
}

// checkUserID refuses the IDs no session can be bound to.
func checkUserID(id string) error {
	if id == "" || len(id) > MaxUserIDLength {
		return fmt.Errorf("%w: %d bytes, want 1 to %d", ErrInvalidUserID, len(id), MaxUserIDLength)
	}
	return nil
}

// UserSession describes one of a user's sessions, as ListUserSessions
// returns it.
type UserSession struct {
	// Handle names the session for DestroyUserSessions. It is opaque and is
	// not a credential: it cannot be used as a cookie.
	Handle string `json:"handle"`
	// Created is when the session was created.
	Created time.Time `json:"created"`
	// LastSeen is when a request last extended the session (within
	// TouchAfter of the idle timeout of the last request).
	LastSeen time.Time `json:"last_seen"`
	// Expires is the session's absolute expiry.
	Expires time.Time `json:"expires"`
	// UserAgent is the User-Agent that created it, when RecordUserAgent is on.
	UserAgent string `json:"user_agent,omitempty"`
}

// ListUserSessions lists the live sessions bound to userID, newest first,
// from the user's index: it never scans the keyspace. Entries whose session
// expired are pruned on the way.
func (st *SessionStore) ListUserSessions(ctx context.Context, userID string) ([]UserSession, error) {
	if st.x != nil {
		return nil, ErrNotInExpressMode
	}
	if err := checkUserID(userID); err != nil {
		return nil, err
	}
	idx := st.userKey(userID)
	now := st.b.clock.Now()
	members, err := st.b.Do(ctx, idx, st.b.client.B().Zrange().Key(idx).Min("+inf").Max(strconv.FormatInt(now.UnixMilli(), 10)).Byscore().Rev().Build()).AsStrSlice()
	if err != nil {
		return nil, err
	}
	out := make([]UserSession, 0, len(members))
	for _, h := range members {
		key, ok := st.keyOf(h)
		if !ok {
			continue
		}
		f, err := st.b.Do(ctx, key, st.b.client.B().Hmget().Key(key).Field(fCreated, fSeen, fAbsolute, fAgent, fUser).Build()).ToArray()
		if err != nil {
			return nil, err
		}
		vals := make([]string, len(f))
		for i := range f {
			vals[i], _ = f[i].ToString()
		}
		if vals[4] != userID {
			continue // not (yet, or any more) this user's session
		}
		ms := func(s string) time.Time { n, _ := strconv.ParseInt(s, 10, 64); return time.UnixMilli(n) }
		if idle := ms(vals[1]); now.Sub(idle) > st.cfg.IdleTimeout {
			continue
		}
		out = append(out, UserSession{Handle: h, Created: ms(vals[0]), LastSeen: ms(vals[1]), Expires: ms(vals[2]), UserAgent: vals[3]})
	}
	// Entries whose session is missing or bound to someone else are left
	// out but not removed: the index is written before the session, so one
	// may belong to a login still in flight. Expired ones go by score.
	if err := st.b.Do(ctx, idx, st.b.client.B().Zremrangebyscore().Key(idx).Min("-inf").Max(strconv.FormatInt(now.UnixMilli(), 10)).Build()).Error(); err != nil {
		st.b.log.Error("redisecho: session: pruning a user's index failed", err)
	}
	return out, nil
}

// DestroyUserSessions ends every session bound to userID except those whose
// handles are listed (the caller's current session, say), for "log out
// everywhere" and password changes. It returns how many it ended. A session
// it ended no longer works when it returns.
//
// It finds the sessions through the user's index. When a session listed in
// except is bound to userID but missing from the index, the index was
// evicted or deleted (it is never missing a live session otherwise), and
// other sessions of the user may live on unseen: it returns
// ErrSessionIndexMissing with the count. So pass the caller's own handle
// (SessionState.Handle) and Destroy the current session separately when it
// should end too; without it, a lost index cannot be told from a user with
// no other session.
func (st *SessionStore) DestroyUserSessions(ctx context.Context, userID string, except ...string) (int, error) {
	if st.x != nil {
		return 0, ErrNotInExpressMode
	}
	if err := checkUserID(userID); err != nil {
		return 0, err
	}
	idx := st.userKey(userID)
	ended := 0
	seen := map[string]bool{}
	listed := map[string]bool{}
	// A regeneration or a login in flight indexes its new handle before it
	// writes the session: pass again until a pass finds nothing new.
	for pass := 0; pass < 5; pass++ {
		members, err := st.b.Do(ctx, idx, st.b.client.B().Zrange().Key(idx).Min("0").Max("-1").Build()).AsStrSlice()
		if err != nil {
			return ended, err
		}
		var done []string
		fresh := false
		for _, h := range members {
			listed[h] = true
			if seen[h] || slices.Contains(except, h) {
				continue
			}
			seen[h], fresh = true, true
			key, ok := st.keyOf(h)
			if !ok {
				done = append(done, h)
				continue
			}
			// Delete the session only if it is this user's. One that exists
			// but is not bound (yet) keeps its index entry: a login in flight
			// is about to bind it.
			res, err := st.runSave(ctx, key, key, destroyArgs(userID))
			if err != nil {
				return ended, err
			}
			switch res.state {
			case "deleted":
				ended++
				st.markGone(key)
				done = append(done, h)
			case "missing":
				done = append(done, h) // the marker refuses a save in flight
			case "unmarked":
				// A full Redis refused the marker: keep the entry, so that a
				// login in flight that lands later is still found.
			}
		}
		if len(done) > 0 {
			if err := st.b.Do(ctx, idx, st.b.client.B().Zrem().Key(idx).Member(done...).Build()).Error(); err != nil {
				return ended, err
			}
		}
		if !fresh {
			break
		}
	}
	for _, h := range except {
		key, ok := st.keyOf(h)
		if !ok || listed[h] {
			continue
		}
		u, err := st.b.Do(ctx, key, st.b.client.B().Hget().Key(key).Field(fUser).Build()).ToString()
		if err != nil && !rueidis.IsRedisNil(err) {
			return ended, err
		}
		if u == userID {
			return ended, ErrSessionIndexMissing
		}
	}
	return ended, nil
}

// SessionState is one request's session. Get it in a handler with GetSession.
// Reads load it from Redis on first use (through client-side caching, so an
// unchanged session costs no round trip); changes are saved when the
// response starts, in one atomic round trip that writes only the values that
// changed. Two requests that change different values therefore both keep
// their change; when they change the same value, the last save wins.
//
// When the session cannot be read or saved (Redis down, breaker open), the
// client gets 503 {"error":"session store unavailable"} instead of the
// handler's response, unless SessionConfig.Degrade is set. A session that
// would outgrow MaxSize gets 413 {"error":"session too large"}. Either way
// the stored session is left as it was.
//
// A SessionState is safe for use by the handler's goroutines.
type SessionState struct {
	st  *SessionStore
	ctx context.Context
	ua  string

	mu            sync.Mutex
	tok           token
	key           string            // st.key(tok)
	hgetall       rueidis.Cacheable // its prebuilt read, from the verified-cookie memo
	hasToken      bool              // the request carried a valid cookie
	spare         []*verifiedCookie // further valid cookies of our name, tried in order if tok names no session
	badCookie     bool              // the request carried a cookie we rejected
	invalid       bool              // it carried cookies of our name and none verified
	cookieVersion int64
	rotated       bool     // signed by an older key of the ring
	xid           string   // Express mode: the session ID
	xspare        []string // Express mode: IDs of further valid cookies

	loaded   bool
	found    bool // the session exists in Redis (when loaded)
	degraded bool
	err      error
	data     sessionData

	set         map[string][]byte // fields to write, "v:…", "f:…" and metadata
	del         map[string]struct{}
	clear       bool // Clear: the save drops every stored value and flash it does not set
	regenerate  bool
	destroy     bool
	userID      string
	userChanged bool
	remember    bool
	rememberSet bool
	touch       bool
	committed   bool
	failure     *sessionFailure
}

type sessionFailure struct {
	code int
	body string
}

var (
	failUnavailable = &sessionFailure{code: http.StatusServiceUnavailable, body: `{"error":"session store unavailable"}`}
	failTooLarge    = &sessionFailure{code: http.StatusRequestEntityTooLarge, body: `{"error":"session too large"}`}
)

// sessionContextKey is the echo.Context key of the request's *SessionState.
const sessionContextKey = "redisecho.session"

// GetSession returns the request's session. It returns
// ErrNoSessionMiddleware, not a panic, when the Session middleware did not
// run. It does no I/O.
func GetSession(c echo.Context) (*SessionState, error) {
	if s, ok := c.Get(sessionContextKey).(*SessionState); ok {
		return s, nil
	}
	return nil, ErrNoSessionMiddleware
}

func (st *SessionStore) newSession(r *http.Request) *SessionState {
	if st.x != nil {
		return st.newExpressSession(r)
	}
	s := &SessionState{st: st, ctx: r.Context(), remember: !st.cfg.BrowserSessionCookie}
	if st.cfg.RecordUserAgent {
		s.ua = r.UserAgent()
		if len(s.ua) > 256 {
			s.ua = s.ua[:256]
		}
	}
	cookies, more := sessionCookies(r, st.cfg.CookieName)
	if len(cookies) == 0 {
		return s // no cookie: an empty new session, read with no I/O (ensureLoaded)
	}
	for _, ck := range cookies {
		vc := st.verify(ck.Value)
		switch {
		case vc == nil: // tampered, malformed or signed by a retired key
		case s.hasToken:
			s.spare = append(s.spare, vc)
		default:
			s.use(vc)
		}
	}
	if !s.hasToken {
		// Only bad cookies: clear ours, unless some went unread (one of
		// those may be valid).
		s.badCookie, s.invalid = !more, true
	}
	return s
}

// maxSessionCookies bounds how many cookies of the session's name a request
// may make the middleware verify and read: a browser sends one per path
// (and domain) level that set one, so a few are plenty.
const maxSessionCookies = 8

// sessionCookies returns the request's cookies named name, in the order the
// client sent them (a browser sends the one with the longest Path first),
// at most maxSessionCookies of them; more reports that there were more.
func sessionCookies(r *http.Request, name string) (cookies []*http.Cookie, more bool) {
	cookies = r.CookiesNamed(name)
	if len(cookies) > maxSessionCookies {
		return cookies[:maxSessionCookies], true
	}
	return cookies, false
}

// use makes vc the session's token. Callers hold s.mu or own s.
func (s *SessionState) use(vc *verifiedCookie) {
	s.tok, s.key, s.hasToken, s.cookieVersion, s.rotated = vc.tok, vc.key, true, vc.version, vc.rotated
	s.hgetall = vc.hgetall
}

// ensureLoaded reads the session on first use. Callers hold s.mu.
func (s *SessionState) ensureLoaded() {
	if s.loaded {
		return
	}
	s.loaded = true
	if !s.hasToken {
		// No cookie, or none that verified: an empty new session, no I/O.
		if s.st.b.obs != nil {
			s.st.observeLoad(s.invalid, false, false)
		}
		return
	}
	if s.st.x != nil {
		s.loadExpress()
		return
	}
	d, found, err := s.st.loadKey(s.ctx, s.key, s.hgetall, s.cookieVersion)
	for err == nil && !found && len(s.spare) > 0 {
		// Several cookies of our name verified (one planted on a sub-path by
		// a sibling site comes first): use the first whose session lives.
		s.use(s.spare[0])
		s.spare = s.spare[1:]
		d, found, err = s.st.loadKey(s.ctx, s.key, s.hgetall, s.cookieVersion)
	}
	switch {
	case err != nil:
		if s.ctx.Err() == nil { // a client that went away is not news
			s.st.b.log.Error("redisecho: session: load failed", err)
			s.st.b.observe(Observation{Kind: ObsSessionError, N: 1})
		}
		if s.st.cfg.Degrade {
			s.degraded = true
		} else {
			s.err = fmt.Errorf("%w: %w", ErrSessionUnavailable, err)
		}
		return
	case found:
		s.found, s.data = true, d
		s.userID = d.fields[fUser]
		s.remember = d.fields[fRemember] == "1"
		s.touch = s.st.touchDue(d)
	}
	if s.st.b.obs != nil {
		s.st.observeLoad(false, found, d.cached)
	}
}

// observeLoad reports a read of a session (ObsSessionLoad): a new session
// when none was found, because the cookies did not verify (invalid) or
// because there was none or it named no live session; else where the
// session came from. Callers check b.obs first.
func (st *SessionStore) observeLoad(invalid, found, cached bool) {
	r := ResultNew
	switch {
	case invalid:
		r = ResultInvalid
	case found && cached:
		r = ResultMemory
	case found:
		r = ResultRedis
	}
	st.b.obs.Observe(Observation{Kind: ObsSessionLoad, Result: r, N: 1})
}

// saved counts a successful save (ObsSessionSave, ResultOK).
func (st *SessionStore) saved() {
	st.saves.Add(1)
	st.b.observe(Observation{Kind: ObsSessionSave, Result: ResultOK, N: 1})
}

// saveErrored counts a save that failed (ObsSessionSave, ResultError).
func (st *SessionStore) saveErrored() {
	st.saveErrors.Add(1)
	st.b.observe(Observation{Kind: ObsSessionSave, Result: ResultError, N: 1})
}

// saveSpan is one save's span (SpanSessionSave) when the store has a
// tracer: started before the save's first Redis write, so that a save that
// writes nothing (a read) has none, and ended with the save's error.
type saveSpan struct {
	ctx context.Context // the context of the save's writes, once started
	end func(error)     // nil until started
	err error
}

// begin starts the span unless it runs, and returns the context for the
// write about to be made: ctx itself when there is no tracer.
func (sp *saveSpan) begin(b *backend, ctx context.Context) context.Context {
	if b.tracer == nil {
		return ctx
	}
	if sp.end == nil {
		sp.ctx, sp.end = b.tracer.StartSpan(ctx, Span{Op: SpanSessionSave})
		if sp.end == nil {
			sp.end = noEnd
		}
	}
	return sp.ctx
}

// fail records err as the save's error. sp may be nil.
func (sp *saveSpan) fail(err error) {
	if sp != nil {
		sp.err = err
	}
}

// finish ends the span, if it started.
func (sp *saveSpan) finish() {
	if sp.end != nil {
		sp.end(sp.err)
	}
}

// Err returns ErrSessionUnavailable (wrapping the cause) when the session
// could not be loaded. The middleware then answers 503 whatever the handler
// writes, so a handler only needs Err to skip work it would waste.
func (s *SessionState) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ensureLoaded()
	return s.err
}

// raw returns the stored or pending encoded value of field. Callers hold s.mu.
func (s *SessionState) raw(field string) ([]byte, bool) {
	if v, ok := s.set[field]; ok {
		return v, true
	}
	if _, ok := s.del[field]; ok {
		return nil, false
	}
	s.ensureLoaded()
	if s.clear && isDataField(field) {
		return nil, false
	}
	if v, ok := s.data.fields[field]; ok {
		return []byte(v), true
	}
	return nil, false
}

// Get decodes the value of key into dst with the store's codec. It reports
// whether the key exists.
func (s *SessionState) Get(key string, dst any) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.raw("v:" + key)
	if !ok {
		return false, nil
	}
	return true, s.st.cfg.Codec.Unmarshal(b, dst)
}

// SessionValue returns the value of key as a T, and whether it exists and
// decoded as a T.
func SessionValue[T any](s *SessionState, key string) (T, bool) {
	var v T
	ok, err := s.Get(key, &v)
	return v, ok && err == nil
}

// GetString returns the string value of key, or "" and false.
func (s *SessionState) GetString(key string) (string, bool) { return SessionValue[string](s, key) }

// GetInt returns the int value of key, or 0 and false.
func (s *SessionState) GetInt(key string) (int, bool) { return SessionValue[int](s, key) }

// GetInt64 returns the int64 value of key, or 0 and false.
func (s *SessionState) GetInt64(key string) (int64, bool) { return SessionValue[int64](s, key) }

// GetFloat64 returns the float64 value of key, or 0 and false.
func (s *SessionState) GetFloat64(key string) (float64, bool) { return SessionValue[float64](s, key) }

// GetBool returns the bool value of key, or false and false.
func (s *SessionState) GetBool(key string) (bool, bool) { return SessionValue[bool](s, key) }

// Has reports whether key has a value.
func (s *SessionState) Has(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.raw("v:" + key)
	return ok
}

// Keys returns the keys that have a value, sorted.
func (s *SessionState) Keys() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ensureLoaded()
	var keys []string
	for f := range s.data.fields {
		if s.clear {
			break
		}
		if k, ok := strings.CutPrefix(f, "v:"); ok {
			if _, gone := s.del[f]; !gone {
				keys = append(keys, k)
			}
		}
	}
	for f := range s.set {
		if k, ok := strings.CutPrefix(f, "v:"); ok {
			if _, stored := s.data.fields[f]; !stored || s.clear {
				keys = append(keys, k)
			}
		}
	}
	slices.Sort(keys)
	return keys
}

// writable checks that a change can still be saved. Callers hold s.mu.
func (s *SessionState) writable() error {
	if s.committed {
		return ErrSessionCommitted
	}
	return nil
}

// checkKey is checkValueKey, and in Express mode refuses the keys that
// express-session owns (cookie, id, its methods).
func (s *SessionState) checkKey(key string) error {
	if s.st.x != nil && reservedExpressKey(key) {
		return fmt.Errorf("%w: %q belongs to express-session", ErrInvalidSessionKey, key)
	}
	return checkValueKey(key)
}

func checkValueKey(key string) error {
	if key == "" || len(key) > 256 {
		return fmt.Errorf("%w: %q", ErrInvalidSessionKey, key)
	}
	return nil
}

// Set stores value under key, encoded with the store's codec. It returns
// ErrSessionTooLarge, and changes nothing, when the session's values would
// exceed MaxSize, or grow beyond AnonymousMaxSize while the session is bound
// to no user; the save re-checks atomically against what Redis holds.
func (s *SessionState) Set(key string, value any) error {
	if err := s.checkKey(key); err != nil {
		return err
	}
	b, err := s.st.cfg.Codec.Marshal(value)
	if err != nil {
		return fmt.Errorf("redisecho: session: encode %q: %w", key, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.setField("v:"+key, b)
}

// setField stages field = b after the size check. Callers hold s.mu.
func (s *SessionState) setField(field string, b []byte) error {
	if err := s.writable(); err != nil {
		return err
	}
	if c := valueCost(field, b); c > s.st.cfg.MaxSize {
		return tooLarge(c, s.st.cfg.MaxSize)
	}
	s.ensureLoaded() // usually a local cache hit: tells the handler about the size limit now
	if s.err != nil {
		return unavailableError(s.err) // a 503 the handler can return as is
	}
	if !s.degraded && s.st.x != nil {
		// The stored JSON, byte for byte; one that Express grew past the
		// bound (it has none) may still shrink.
		if cur, size := s.expressSizes(field, b); size > s.st.cfg.MaxSize && size > cur {
			return tooLarge(size, s.st.cfg.MaxSize)
		}
	} else if !s.degraded {
		cur := s.size()
		size := cur + valueCost(field, b)
		if old, ok := s.raw(field); ok {
			size -= valueCost(field, old)
		}
		if size > s.st.cfg.MaxSize {
			return tooLarge(size, s.st.cfg.MaxSize)
		}
		if limit := s.st.cfg.AnonymousMaxSize; s.userID == "" && size > limit && size > cur {
			return tooLarge(size, limit)
		}
	}
	if s.set == nil {
		s.set = make(map[string][]byte)
	}
	s.set[field] = b
	delete(s.del, field)
	return nil
}

// SessionValueOverhead is what each session value or flash counts towards
// MaxSize and AnonymousMaxSize besides its encoded size and its key: about
// what Redis spends per hash field.
const SessionValueOverhead = 32

// valueCost is what field = v counts towards a session's size.
func valueCost[B string | []byte](field string, v B) int {
	return len(field) + len(v) + SessionValueOverhead
}

// tooLarge is Set's refusal: a 413 for the handler to return as is, which
// errors.Is matches with ErrSessionTooLarge.
func tooLarge(size, limit int) error {
	return &echo.HTTPError{
		Code: http.StatusRequestEntityTooLarge, Message: "session too large",
		Internal: fmt.Errorf("%w: %d bytes, limit %d", ErrSessionTooLarge, size, limit),
	}
}

// size is what values and flashes count towards MaxSize (see valueCost),
// pending changes applied.
// Callers hold s.mu and have loaded the session.
func (s *SessionState) size() int {
	n := 0
	for f, v := range s.data.fields {
		if isDataField(f) && !s.clear {
			if _, gone := s.del[f]; !gone {
				if _, changed := s.set[f]; !changed {
					n += valueCost(f, v)
				}
			}
		}
	}
	for f, v := range s.set {
		if isDataField(f) {
			n += valueCost(f, v)
		}
	}
	return n
}

func isDataField(f string) bool { return strings.HasPrefix(f, "v:") || strings.HasPrefix(f, "f:") }

// Delete removes the value of key.
func (s *SessionState) Delete(key string) error {
	if err := s.checkKey(key); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.deleteField("v:" + key)
}

func (s *SessionState) deleteField(field string) error {
	if err := s.writable(); err != nil {
		return err
	}
	if s.del == nil {
		s.del = make(map[string]struct{})
	}
	delete(s.set, field)
	s.del[field] = struct{}{}
	return nil
}

// SetFlash stores a flash message under key: it is read once, by Flash, in
// this or a later request.
func (s *SessionState) SetFlash(key string, value any) error {
	if s.st.x != nil {
		return ErrNotInExpressMode
	}
	if err := checkValueKey(key); err != nil {
		return err
	}
	b, err := s.st.cfg.Codec.Marshal(value)
	if err != nil {
		return fmt.Errorf("redisecho: session: encode flash %q: %w", key, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.setField("f:"+key, b)
}

// Flash decodes the flash message under key into dst and removes it. It
// reports whether there was one.
func (s *SessionState) Flash(key string, dst any) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.raw("f:" + key)
	if !ok {
		return false, nil
	}
	if err := s.deleteField("f:" + key); err != nil {
		return true, err
	}
	return true, s.st.cfg.Codec.Unmarshal(b, dst)
}

// Regenerate gives the session a new ID when the response starts, keeping
// its data and its absolute lifetime, atomically: the old ID stops working
// at that moment, with no grace window. Call it on every privilege change
// (login, logout, role change), against session fixation.
func (s *SessionState) Regenerate() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writable(); err != nil {
		return err
	}
	s.ensureLoaded() // to move the session in its user's index
	s.regenerate = true
	return nil
}

// Clear deletes every value and flash of the session, keeping its ID, its
// user binding and its lifetime: those it holds when the save runs,
// atomically, including any that another request saved after this one read
// the session; values set after Clear in this request are kept. Call it
// with Regenerate and SetUserID when someone logs in on a browser whose
// session belongs to another user, so that none of the previous user's
// values carry over.
func (s *SessionState) Clear() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writable(); err != nil {
		return err
	}
	s.ensureLoaded()
	// The save deletes every value and flash stored when it runs, including
	// those another request saved after this one read the session.
	s.clear = true
	for f := range s.set {
		if isDataField(f) {
			delete(s.set, f)
		}
	}
	for f := range s.del {
		if isDataField(f) {
			delete(s.del, f)
		}
	}
	return nil
}

// Destroy deletes the session from Redis when the response starts and
// clears the cookie. Later changes in the same request are dropped.
func (s *SessionState) Destroy() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writable(); err != nil {
		return err
	}
	s.destroy = true
	return nil
}

// SetUserID binds the session to a user, recording it in the user's index
// for ListUserSessions and DestroyUserSessions; "" unbinds it. A bound
// session lives under IdleTimeout and MaxSize, an unbound one under
// AnonymousIdleTimeout and AnonymousMaxSize. It returns ErrInvalidUserID
// for an ID longer than MaxUserIDLength.
func (s *SessionState) SetUserID(id string) error {
	if s.st.x != nil {
		return ErrNotInExpressMode
	}
	if len(id) > MaxUserIDLength {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrInvalidUserID, len(id), MaxUserIDLength)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writable(); err != nil {
		return err
	}
	s.ensureLoaded()
	if id != s.userID {
		s.userID, s.userChanged = id, true
	}
	return nil
}

// UserID returns the user the session is bound to, or "". In Express mode
// it is the value of ExpressSessionConfig.UserIDKey (the guide's userId),
// as stored when the session was read.
func (s *SessionState) UserID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ensureLoaded()
	return s.userID
}

// SetRememberMe chooses a persistent cookie (Max-Age = remaining lifetime)
// when on, or a browser-session cookie when off, for this session.
func (s *SessionState) SetRememberMe(on bool) error {
	if s.st.x != nil {
		return ErrNotInExpressMode
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writable(); err != nil {
		return err
	}
	s.remember, s.rememberSet = on, true
	return nil
}

// IsNew reports whether the session does not exist in Redis yet.
func (s *SessionState) IsNew() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ensureLoaded()
	return !s.found
}

// Handle returns the session's handle in its user's index ("" for a new
// session): compare it with UserSession.Handle to mark the current session.
func (s *SessionState) Handle() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ensureLoaded()
	if !s.found || s.st.x != nil {
		return ""
	}
	return s.tok.handle()
}

// Alive reports whether the session with handle (SessionState.Handle)
// still exists and has not expired: one uncached Redis read (so a session
// destroyed on another instance is seen at once) that does not extend the
// session's idle timeout. The SSE glue calls it to end a stream whose
// session is gone. An unknown or malformed handle is not alive.
func (st *SessionStore) Alive(ctx context.Context, handle string) (bool, error) {
	key, ok := st.keyOf(handle)
	if !ok {
		return false, nil
	}
	fields := []string{fVersion, fAbsolute, fSeen, fIdle}
	vals, err := st.b.Do(ctx, key, st.b.client.B().Hmget().Key(key).Field(fields...).Build()).ToArray()
	if err != nil {
		return false, err
	}
	m := make(map[string]string, len(fields))
	for i, f := range fields {
		if i < len(vals) {
			if v, err := vals[i].ToString(); err == nil {
				m[f] = v
			}
		}
	}
	_, found := st.parse(m)
	return found, nil
}

// Store returns the session's store, for ListUserSessions and
// DestroyUserSessions.
func (s *SessionState) Store() *SessionStore { return s.st }

// dirty reports whether data changes are pending. Callers hold s.mu.
func (s *SessionState) dirty() bool {
	return len(s.set) > 0 || len(s.del) > 0 || s.clear || s.regenerate || s.userChanged || s.rememberSet
}

// sessionCookie is the outcome of a save for the response's headers.
type sessionCookie struct {
	value  string
	maxAge int // > 0 persistent, 0 browser session, < 0 clear
	// expires: Express mode sends Expires = now + maxAge, as
	// express-session does, instead of Max-Age.
	expires bool
}

// save writes the pending changes and tells what cookie to send (nil: none).
// Callers hold s.mu.
func (s *SessionState) save() (ck *sessionCookie, f *sessionFailure) {
	var sp saveSpan
	if s.st.x != nil {
		ck, f = s.saveExpress(&sp)
	} else {
		ck, f = s.saveNative(&sp)
	}
	sp.finish()
	return ck, f
}

// saveNative is save outside Express mode, its span sp started before its
// first write.
func (s *SessionState) saveNative(sp *saveSpan) (*sessionCookie, *sessionFailure) {
	s.committed = true
	st := s.st
	if s.degraded || s.err != nil {
		return nil, nil // nothing was read, so nothing may be written
	}
	// The save outlives a client that disconnects: the handler's work is
	// done, so its changes are kept. The call still has its deadline.
	ctx := context.WithoutCancel(s.ctx)
	now := st.b.clock.Now()
	if s.destroy {
		if !s.hasToken {
			if s.badCookie {
				return &sessionCookie{maxAge: -1}, nil
			}
			return nil, nil
		}
		ctx = sp.begin(st.b, ctx)
		res, err := st.runSave(ctx, s.key, s.key, destroyArgs(""))
		if err != nil {
			return nil, st.saveFailed(sp, err)
		}
		st.markGone(s.key)
		st.saved()
		if res.prevUser != "" {
			st.unindex(ctx, res.prevUser, s.tok.handle())
		}
		return &sessionCookie{maxAge: -1}, nil
	}
	if !s.dirty() {
		switch {
		case s.touch:
			ctx = sp.begin(st.b, ctx)
			res, err := st.runSave(ctx, s.key, s.key, st.saveArgs("update", now, 0, false, nil, nil))
			if errors.Is(err, errSessionGone) {
				return &sessionCookie{maxAge: -1}, nil
			}
			if err != nil {
				// A failed extension loses nothing: log it, keep the response.
				st.b.log.Error("redisecho: session: extending the idle timeout failed", err)
				st.saveErrored()
				sp.fail(err)
				return nil, nil
			}
			st.saved()
			if s.rotated {
				return st.cookieFor(s.tok, res, now), nil
			}
		case s.rotated && s.found:
			return st.cookieFor(s.tok, saveResult{version: s.data.version, absolute: time.UnixMilli(s.data.absolute), remember: s.remember}, now), nil
		case s.badCookie || (s.hasToken && s.loaded && !s.found && s.err == nil):
			return &sessionCookie{maxAge: -1}, nil
		}
		return nil, nil
	}

	if s.rememberSet {
		s.stage(fRemember, boolField(s.remember))
	}
	if s.userChanged || s.regenerate {
		// A regeneration writes the binding this request saw, so that the
		// moved session and the index entries written for it agree even if
		// another request bound or unbound it meanwhile (last writer wins).
		s.stage(fUser, []byte(s.userID))
	}
	if s.hasToken && (!s.loaded || s.found) {
		var (
			res    saveResult
			err    error
			dst    = s.tok
			dstKey = s.key
		)
		ctx = sp.begin(st.b, ctx)
		for attempt := 0; ; attempt++ {
			if s.regenerate {
				dst = newToken(s.tok.tag)
				dstKey = st.key(dst)
			}
			if s.userID != "" && (s.userChanged || s.regenerate) {
				if f := st.indexFor(ctx, sp, s.userID, dst.handle(), time.UnixMilli(s.data.absolute), now); f != nil {
					return nil, f
				}
			}
			args := st.saveArgs("update", now, 0, true, s.set, s.del)
			if s.clear {
				args[9] = "1"
			}
			res, err = st.runSave(ctx, s.key, dstKey, args)
			// The new ID may be taken (a destroy left its marker there while
			// this regeneration was in flight): the session is still at its
			// old ID, so try another new one.
			if !(errors.Is(err, errSessionCollision) && s.regenerate && attempt < 3) {
				break
			}
		}
		switch {
		case err == nil:
			st.saved()
			if res.prevUser != "" && (res.prevUser != s.userID || dst != s.tok) {
				st.unindex(ctx, res.prevUser, s.tok.handle())
			}
			if dst != s.tok {
				st.markGone(s.key) // renamed: the old ID is dead here at once
			}
			s.tok, s.key = dst, dstKey
			return st.cookieFor(dst, res, now), nil
		case !errors.Is(err, errSessionGone):
			return nil, st.saveFailed(sp, err)
		}
		// Expired or destroyed meanwhile: start a new session with only the
		// changes of this request. A user binding this request did not make
		// is not carried over: "log out everywhere" must stick.
		st.markGone(s.key)
		s.found = false
		if !s.userChanged {
			s.userID = ""
			delete(s.set, fUser)
		}
	}
	return s.create(ctx, sp, now)
}

// create saves a new session with the pending changes, its span sp
// started before its first write. Callers hold s.mu.
func (s *SessionState) create(ctx context.Context, sp *saveSpan, now time.Time) (*sessionCookie, *sessionFailure) {
	st := s.st
	if s.userID == "" && !slices.ContainsFunc(slices.Collect(maps.Keys(s.set)), isDataField) {
		// Nothing worth storing (a regeneration or a remember-me choice on
		// an empty session): no key, no cookie (saveUninitialized: false).
		if s.badCookie || s.hasToken {
			return &sessionCookie{maxAge: -1}, nil
		}
		return nil, nil
	}
	abs := now.Add(st.cfg.Lifetime)
	s.stage(fRemember, boolField(s.remember))
	if s.ua != "" {
		s.stage(fAgent, []byte(s.ua))
	}
	if s.userID != "" {
		s.stage(fUser, []byte(s.userID))
	}
	ctx = sp.begin(st.b, ctx)
	for range 3 { // a collision of 280 random bits is not expected; retry anyway
		t := newToken("")
		if s.userID != "" {
			if f := st.indexFor(ctx, sp, s.userID, t.handle(), abs, now); f != nil {
				return nil, f
			}
		}
		res, err := st.runSave(ctx, st.key(t), st.key(t), st.saveArgs("new", now, abs.UnixMilli(), true, s.set, s.del))
		if errors.Is(err, errSessionCollision) {
			continue
		}
		if err != nil {
			return nil, st.saveFailed(sp, err)
		}
		st.saved()
		s.tok, s.key, s.hasToken, s.found = t, st.key(t), true, true
		return st.cookieFor(t, res, now), nil
	}
	return nil, st.saveFailed(sp, errSessionCollision)
}

func (s *SessionState) stage(field string, v []byte) {
	if s.set == nil {
		s.set = make(map[string][]byte)
	}
	s.set[field] = v
}

func boolField(b bool) []byte {
	if b {
		return []byte("1")
	}
	return []byte("0")
}

// saveArgs builds saveScript's ARGV, with the anonymous limits for
// sessions bound to no user.
func (st *SessionStore) saveArgs(mode string, now time.Time, abs int64, bump bool, set map[string][]byte, del map[string]struct{}) []string {
	return st.saveArgsWith(st.cfg.AnonymousIdleTimeout, st.cfg.AnonymousMaxSize, mode, now, abs, bump, set, del)
}

// saveArgsWith is saveArgs with the limits of unbound sessions given.
func (st *SessionStore) saveArgsWith(anonIdle time.Duration, anonMax int, mode string, now time.Time, abs int64, bump bool, set map[string][]byte, del map[string]struct{}) []string {
	args := make([]string, 10, 10+2*len(set)+len(del))
	args[0] = mode
	args[1] = strconv.FormatInt(now.UnixMilli(), 10)
	args[2] = strconv.FormatInt(st.cfg.IdleTimeout.Milliseconds(), 10)
	args[3] = strconv.FormatInt(abs, 10)
	args[4] = strconv.Itoa(st.cfg.MaxSize)
	args[5] = string(boolField(bump))
	args[6] = strconv.FormatInt(anonIdle.Milliseconds(), 10)
	args[7] = strconv.Itoa(anonMax)
	args[8] = strconv.Itoa(len(set))
	args[9] = "0"
	for f, v := range set {
		args = append(args, f, string(v))
	}
	for f := range del {
		args = append(args, f)
	}
	return args
}

// destroyArgs is saveScript's ARGV for a destroy, of a session bound to
// userID ("": whatever its binding).
func destroyArgs(userID string) []string {
	return []string{"destroy", "0", "0", userID, "0", "0", "0", "0", "0", "0"}
}

// saveFailed handles a save that err failed, whose span is sp (nil: none):
// a refusal for size is the client's 413; anything else is counted and
// logged, and answered 503 unless the store degrades.
func (st *SessionStore) saveFailed(sp *saveSpan, err error) *sessionFailure {
	sp.fail(err)
	if errors.Is(err, ErrSessionTooLarge) {
		return failTooLarge
	}
	st.saveErrored()
	st.b.log.Error("redisecho: session: save failed", err)
	if st.cfg.Degrade {
		return nil
	}
	return failUnavailable
}

func (st *SessionStore) cookieFor(t token, res saveResult, now time.Time) *sessionCookie {
	c := &sessionCookie{value: st.encodeCookie(st.cfg.CookieName, t, res.version)}
	if res.remember {
		c.maxAge = max(int(res.absolute.Sub(now).Round(time.Second)/time.Second), 1)
	}
	return c
}

// index records handle in the user's index before the session is written,
// so a live session is never missing from it.
func (st *SessionStore) index(ctx context.Context, userID, handle string, abs, now time.Time) *sessionFailure {
	return st.indexFor(ctx, nil, userID, handle, abs, now)
}

// indexFor is index for the save whose span is sp.
func (st *SessionStore) indexFor(ctx context.Context, sp *saveSpan, userID, handle string, abs, now time.Time) *sessionFailure {
	idx := st.userKey(userID)
	err := st.b.Exec(ctx, indexScript, []string{idx}, []string{
		strconv.FormatInt(now.UnixMilli(), 10), handle, strconv.FormatInt(abs.UnixMilli(), 10),
	}).Error()
	if err != nil {
		return st.saveFailed(sp, err)
	}
	return nil
}

// unindex removes handle from the user's index once the session no longer
// answers to it. A failure leaves a stale entry that ListUserSessions prunes.
func (st *SessionStore) unindex(ctx context.Context, userID, handle string) {
	idx := st.userKey(userID)
	if err := st.b.Do(ctx, idx, st.b.client.B().Zrem().Key(idx).Member(handle).Build()).Error(); err != nil {
		st.b.log.Error("redisecho: session: removing a session from its user's index failed", err)
	}
}

// Middleware returns the Echo middleware of the store.
func (st *SessionStore) Middleware() echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			if st.cfg.Skipper(c) {
				return next(c)
			}
			s := st.newSession(c.Request())
			c.Set(sessionContextKey, s)
			res := c.Response()
			orig := res.Writer
			// The save runs when the response starts, so its cookie goes
			// out with the headers and a failure replaces the response.
			res.Before(func() { st.commit(c, s) })
			defer func() {
				if p := recover(); p != nil {
					// A handler that panicked saves nothing: its changes may
					// be half made. The recovering middleware answers.
					s.mu.Lock()
					s.committed = true
					s.mu.Unlock()
					panic(p)
				}
			}()
			err := next(c)
			if !res.Committed {
				// No response yet (none written, or an error for Echo's
				// error handler): save now, so a failure can replace it.
				st.commit(c, s)
				if s.failure != nil {
					res.Writer = orig
					return c.Blob(s.failure.code, echo.MIMEApplicationJSON, []byte(s.failure.body))
				}
				return err
			}
			if s.failure != nil {
				// The handler's body was discarded; send the error instead.
				_, _ = orig.Write([]byte(s.failure.body))
			}
			return err
		}
	}
}

// commit saves the session once, before the response's headers go out.
func (st *SessionStore) commit(c echo.Context, s *SessionState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.committed {
		return
	}
	res := c.Response()
	if !s.loaded && len(s.spare) > 0 && (s.destroy || s.dirty()) {
		// Several cookies verified: write to (or destroy) the one whose
		// session lives, never to a planted one that names none.
		s.ensureLoaded()
	}
	if s.err != nil && !s.st.cfg.Degrade {
		s.failure = failUnavailable
	}
	var ck *sessionCookie
	if s.failure == nil {
		ck, s.failure = s.save()
	}
	s.committed = true
	if s.failure != nil {
		h := res.Header()
		for _, k := range []string{echo.HeaderContentLength, echo.HeaderContentEncoding, "ETag", echo.HeaderLastModified, echo.HeaderSetCookie} {
			h.Del(k)
		}
		h.Set(echo.HeaderContentType, echo.MIMEApplicationJSON)
		h.Set(echo.HeaderCacheControl, "no-store")
		res.Status = s.failure.code
		res.Writer = discardBody{res.Writer}
		return
	}
	h := res.Header()
	if !st.cfg.AllowSharedCaching && s.found && (s.userID != "" || s.data.fields[fUser] != "" || st.x != nil) {
		// The handler read a logged-in session: the response may be
		// personal, so no shared cache may keep it.
		if h.Get(echo.HeaderCacheControl) == "" {
			h.Set(echo.HeaderCacheControl, "private")
		}
		addVaryCookie(h)
	}
	if ck == nil {
		return
	}
	if st.x != nil {
		st.x.writeExpressCookie(h, st.cfg.CookieName, ck, st.b.clock.Now())
		addVaryCookie(h)
		h.Set(echo.HeaderCacheControl, "no-store")
		return
	}
	cookie := &http.Cookie{
		Name: st.cfg.CookieName, Value: ck.value, Path: st.cfg.CookiePath, Domain: st.cfg.CookieDomain,
		Secure: !st.cfg.InsecureCookie, HttpOnly: true, SameSite: st.cfg.SameSite, MaxAge: ck.maxAge,
	}
	h.Add(echo.HeaderSetCookie, cookie.String())
	addVaryCookie(h)
	h.Set(echo.HeaderCacheControl, "no-store")
}

// addVaryCookie adds Cookie to the response's Vary unless it is there (or
// Vary is "*"), keeping the other values.
func addVaryCookie(h http.Header) {
	for _, v := range h.Values(echo.HeaderVary) {
		for f := range strings.SplitSeq(v, ",") {
			if f = strings.TrimSpace(f); f == "*" || strings.EqualFold(f, echo.HeaderCookie) {
				return
			}
		}
	}
	h.Add(echo.HeaderVary, echo.HeaderCookie)
}

// discardBody passes the header through and drops the body: it stands in
// for the handler's writer once a failed save replaced its response.
type discardBody struct{ http.ResponseWriter }

func (d discardBody) Write(p []byte) (int, error) { return len(p), nil }

// Unwrap lets http.ResponseController reach the real writer.
func (d discardBody) Unwrap() http.ResponseWriter { return d.ResponseWriter }

// ---- gorilla/sessions compatibility (echo-contrib/session) ----

// ErrGorillaSessionUnknown is returned by GorillaStore.Save for a session that
// this store did not create through Get or New on the same request (one made
// with sessions.NewSession, or saved with another request), because the
// store cannot tell which of its values changed.
var ErrGorillaSessionUnknown = errors.New("redisecho: session: this session was not loaded by this GorillaStore for this request")

// ErrGorillaValueKey is returned by GorillaStore.Save when a key of
// Session.Values is not a string, or is a string that is empty or longer
// than 256 bytes. Nothing is saved.
var ErrGorillaValueKey = errors.New("redisecho: session: gorilla value keys must be non-empty strings of at most 256 bytes")

// GorillaStore is a github.com/gorilla/sessions Store backed by a
// SessionStore, for applications written for
// github.com/labstack/echo-contrib/session (or gorilla/sessions directly):
//
//	store, err := redisecho.NewSessionStore(redisecho.SessionConfig{Client: client, Keys: keys})
//	...
//	e.Use(session.Middleware(redisecho.NewGorillaStore(store)))
//
// and handlers keep calling session.Get("session", c), reading and writing
// sess.Values, and sess.Save(c.Request(), c.Response()).
//
// Storage is the SessionStore's: the same Redis hash per session, the same
// signed cookie format and key ring (rotation works the same way), the same
// Lifetime and IdleTimeout enforced by Redis, MaxSize (the gorilla API has
// no user binding, so AnonymousIdleTimeout and AnonymousMaxSize do not
// apply to its sessions), and the user index
// (a session bound to a user through the SessionState API is removed from
// the index when the gorilla side deletes it).
//
// Cookie name. The cookie is named after the session name given to Get
// (gorilla's convention), not SessionConfig.CookieName. Its MAC binds that
// name, so a cookie issued for one name is rejected under another. A
// session whose name is SessionConfig.CookieName ("sessionId" by default)
// has exactly the cookie the Session middleware issues, so both APIs open
// the same session from the same cookie.
//
// Values. Keys must be strings. Each value is encoded on its own with
// GobCodec into the hash field "v:<key>", as SessionState stores values, so
// types survive a reload: an int stays an int (register custom types with
// gob.Register, as with any gorilla store). Values written by the Session
// middleware with another codec (JSONCodec, the default) are not decodable
// with gob: the gorilla session does not show them and never changes or
// deletes them. With SessionConfig.Codec set to GobCodec the two APIs read
// each other's values. Flashes are ordinary values ("_flash" keys).
//
// Saves. Save writes, in one atomic round trip, only the values that differ
// from what Get loaded (added, changed or deleted), so two requests that
// change different values of one session both keep their change; for one
// value the last save wins. (Maps are encoded in random order by gob, so a
// map value may be rewritten although it did not change.) An empty new
// session is not stored and gets no cookie. A session that expired or was
// destroyed between Get and Save is not brought back: the values this
// request changed go to a new session, the others are dropped from Values.
// Options.MaxAge < 0 deletes the session from Redis and clears the cookie.
// Call Save before the response is written, as with every gorilla store: on
// an *echo.Response that was already committed Save returns
// ErrSessionCommitted and writes nothing.
//
// Lifetime. The server enforces Lifetime and IdleTimeout whatever the
// cookie says. Options.MaxAge > 0 gives a persistent cookie whose Max-Age is
// MaxAge capped at the session's remaining Lifetime; MaxAge 0 gives a
// browser-session cookie. The default options of a session follow the
// store's (SessionConfig.BrowserSessionCookie, or the kind of cookie the
// stored session has). A Get that finds TouchAfter of the idle timeout
// passed extends it, so sessions of applications that only Save when they
// change something do not time out while in use.
//
// Cookie attributes. Options.Path, Domain, SameSite and Partitioned are
// used when set, falling back to SessionConfig's. The cookie is always
// HttpOnly, and Secure unless SessionConfig.InsecureCookie (Options.Secure
// can only add it). Responses that set or clear the cookie get
// "Vary: Cookie" and "Cache-Control: no-store".
//
// Errors. A missing, malformed, tampered or unknown cookie gives a new
// empty session and no error, so handlers that "return err" do not answer
// 500. When Redis cannot be read, Get and New return a usable empty session
// and an *echo.HTTPError 503 {"message":"session store unavailable"} whose
// Internal error wraps ErrSessionUnavailable; that session's Save returns
// the same error and writes nothing. With SessionConfig.Degrade, Get
// returns the empty session and no error instead, and its Save writes
// nothing and returns nil. Save failures are *echo.HTTPError too: 503
// (wrapping ErrSessionUnavailable) or 413 (wrapping ErrSessionTooLarge),
// with no internal detail in the message; errors.Is sees the cause.
//
// The gorilla API has no user binding or regeneration: use the Session
// middleware (SessionState.Regenerate, SetUserID) for those, or delete the
// session (MaxAge -1) and start a new one on login.
type GorillaStore struct {
	st *SessionStore
}

// NewGorillaStore returns the gorilla/sessions Store of st. It does no I/O.
// A store in Express mode (NewExpressSessionStore) has no gorilla API: its
// New and Save return ErrNotInExpressMode.
func NewGorillaStore(st *SessionStore) *GorillaStore {
	return &GorillaStore{st: st}
}

var _ sessions.Store = (*GorillaStore)(nil)

// gorillaState is what the store remembers about a session between New and
// Save.
type gorillaState struct {
	mu        sync.Mutex // serialises Saves of the session
	store     *GorillaStore
	tok       token
	hasToken  bool // the request carried a valid cookie, or Save issued one
	badCookie bool // the request carried a cookie that was rejected
	rotated   bool // signed by an older key of the ring
	found     bool // the session exists in Redis
	remember  bool // the stored "_r" flag: a persistent cookie
	degraded  bool
	err       error             // the load failed: Save refuses
	snapshot  map[string][]byte // "v:<key>" → encoded value, as loaded or last saved
	userAgent string            // for a new session, when RecordUserAgent
	absolute  time.Time         // absolute expiry of a found session
	version   int64             // version of a found session
}

// gorillaStatesKey is the request-context key of a request's states.
type gorillaStatesKey struct{}

// gorillaStates maps the sessions a request loaded to their state.
type gorillaStates struct {
	mu sync.Mutex
	m  map[*sessions.Session]*gorillaState
}

// gorillaStatesOf returns the request's states, attaching them to r (in place, as
// gorilla's registry does) when create is set.
func gorillaStatesOf(r *http.Request, create bool) *gorillaStates {
	if v, ok := r.Context().Value(gorillaStatesKey{}).(*gorillaStates); ok {
		return v
	}
	if !create {
		return nil
	}
	v := &gorillaStates{m: make(map[*sessions.Session]*gorillaState)}
	*r = *r.WithContext(context.WithValue(r.Context(), gorillaStatesKey{}, v))
	return v
}

// Get returns the named session of the request through gorilla's
// per-request registry, loading it from Redis on the first call.
func (gs *GorillaStore) Get(r *http.Request, name string) (*sessions.Session, error) {
	return sessions.GetRegistry(r).Get(gs, name)
}

// New loads the named session of the request from Redis, or returns a new
// empty one. It never returns a nil session. See GorillaStore for the
// errors.
func (gs *GorillaStore) New(r *http.Request, name string) (*sessions.Session, error) {
	if gs.st.x != nil {
		return sessions.NewSession(gs, name), ErrNotInExpressMode
	}
	st := gs.st
	s := sessions.NewSession(gs, name)
	s.IsNew = true
	state := &gorillaState{store: gs, remember: !st.cfg.BrowserSessionCookie}
	defer func() {
		s.Options = gs.defaultOptions(state)
		states := gorillaStatesOf(r, true)
		states.mu.Lock()
		states.m[s] = state
		states.mu.Unlock()
	}()
	if st.cfg.RecordUserAgent {
		state.userAgent = r.UserAgent()
		if len(state.userAgent) > 256 {
			state.userAgent = state.userAgent[:256]
		}
	}
	if !validCookieName(name) {
		state.err = fmt.Errorf("redisecho: session: invalid cookie name %q", name)
		return s, state.err
	}
	// Of several cookies of this name (one planted on a sub-path by a
	// sibling site comes first), use the first that verifies and names a
	// live session; one that does not verify clears nothing.
	var (
		tok   token
		d     sessionData
		found bool
	)
	cookies, more := sessionCookies(r, name)
	for _, ck := range cookies {
		t, version, rotated, ok := gs.st.decodeCookie(name, ck.Value)
		if !ok {
			state.badCookie = !state.hasToken && !more // tampered, malformed or signed by a retired key
			continue
		}
		if !state.hasToken {
			state.tok, state.hasToken, state.badCookie, state.rotated = t, true, false, rotated
		}
		var err error
		d, found, err = st.load(r.Context(), t, version)
		if err != nil {
			if r.Context().Err() == nil {
				st.b.log.Error("redisecho: session: load failed", err)
				st.b.observe(Observation{Kind: ObsSessionError, N: 1})
			}
			if st.cfg.Degrade {
				state.degraded = true
				return s, nil
			}
			state.err = unavailableError(err)
			return s, state.err
		}
		if found {
			tok = t
			state.tok, state.rotated = t, rotated
			break
		}
	}
	if !found {
		// None, or expired, destroyed or unknown: a new session.
		if st.b.obs != nil {
			st.observeLoad(len(cookies) > 0 && !state.hasToken, false, false)
		}
		return s, nil
	}
	now := st.b.clock.Now()
	if st.touchDue(d) {
		// Reading the session is activity: extend the idle timeout here,
		// since gorilla applications often Save only when they change it.
		ctx, end := st.b.startSpan(context.WithoutCancel(r.Context()), Span{Op: SpanSessionSave})
		res, err := st.runSave(ctx, st.key(tok), st.key(tok), gs.saveArgs("update", now, 0, false, nil, nil))
		switch {
		case errors.Is(err, errSessionGone):
			end(nil)
			st.markGone(st.key(tok))
			if st.b.obs != nil {
				st.observeLoad(false, false, false) // gone since the read: a new session
			}
			return s, nil
		case err != nil:
			end(err)
			st.b.log.Error("redisecho: session: extending the idle timeout failed", err)
			st.saveErrored()
		default:
			end(nil)
			st.saved()
			d.version = max(d.version, res.version)
		}
	}
	if st.b.obs != nil {
		st.observeLoad(false, true, d.cached)
	}
	state.found, state.version, state.absolute = true, d.version, time.UnixMilli(d.absolute)
	state.remember = d.fields[fRemember] == "1"
	state.snapshot = make(map[string][]byte)
	for f, raw := range d.fields {
		key, ok := strings.CutPrefix(f, "v:")
		if !ok {
			continue
		}
		var v any
		if err := (GobCodec{}).Unmarshal([]byte(raw), &v); err != nil {
			continue // written with another codec: not ours to show or change
		}
		s.Values[key] = v
		state.snapshot[f] = []byte(raw)
	}
	s.IsNew = false
	s.ID = tok.handle()
	return s, nil
}

// defaultOptions are the options of a session as New returns it.
func (gs *GorillaStore) defaultOptions(state *gorillaState) *sessions.Options {
	cfg := &gs.st.cfg
	o := &sessions.Options{
		Path: cfg.CookiePath, Domain: cfg.CookieDomain,
		Secure: !cfg.InsecureCookie, HttpOnly: true, SameSite: cfg.SameSite,
	}
	switch {
	case state.found && state.remember:
		o.MaxAge = max(int(state.absolute.Sub(gs.st.b.clock.Now()).Round(time.Second)/time.Second), 1)
	case !state.found && state.remember:
		o.MaxAge = int(cfg.Lifetime / time.Second)
	}
	return o
}

// Save writes the session's changes to Redis and sets its cookie. See
// GorillaStore for what it writes and the errors it returns.
func (gs *GorillaStore) Save(r *http.Request, w http.ResponseWriter, s *sessions.Session) error {
	if gs.st.x != nil {
		return ErrNotInExpressMode
	}
	state := gs.stateOf(r, s)
	if state == nil {
		return ErrGorillaSessionUnknown
	}
	state.mu.Lock()
	defer state.mu.Unlock()
	switch {
	case state.degraded:
		return nil // nothing was read, so nothing may be written
	case state.err != nil:
		return state.err
	}
	if res, ok := w.(*echo.Response); ok && res.Committed {
		return ErrSessionCommitted
	}
	st := gs.st
	opts := s.Options
	if opts == nil {
		opts = gs.defaultOptions(state)
	}
	// The save outlives a client that disconnects; it keeps its deadline.
	ctx := context.WithoutCancel(r.Context())
	now := st.b.clock.Now()
	var sp saveSpan // started before the first write
	defer sp.finish()

	if opts.MaxAge < 0 {
		if state.hasToken {
			ctx = sp.begin(st.b, ctx)
			res, err := st.runSave(ctx, st.key(state.tok), st.key(state.tok), destroyArgs(""))
			if err != nil {
				return gs.saveError(&sp, err)
			}
			st.markGone(st.key(state.tok))
			st.saved()
			if res.prevUser != "" {
				st.unindex(ctx, res.prevUser, state.tok.handle())
			}
		}
		gs.reset(state, s)
		gs.setCookie(w, s.Name(), "", opts, -1)
		return nil
	}

	set, del, err := gs.changes(s, state)
	if err != nil {
		return err
	}
	remember := opts.MaxAge > 0
	deadCookie := state.badCookie || state.hasToken // a cookie to clear if nothing is stored
	if state.found {
		if remember != state.remember {
			set[fRemember] = boolField(remember)
		}
		if len(set) == 0 && len(del) == 0 {
			if state.rotated {
				// Re-sign a cookie signed by an older key.
				gs.setCookie(w, s.Name(), gs.st.encodeCookie(s.Name(), state.tok, state.version), opts, gs.maxAge(opts, state.absolute, now))
				state.rotated = false
			}
			return nil
		}
		ctx = sp.begin(st.b, ctx)
		res, err := st.runSave(ctx, st.key(state.tok), st.key(state.tok), gs.saveArgs("update", now, 0, true, set, del))
		switch {
		case err == nil:
			st.saved()
			gs.saved(state, res, set, del)
			gs.setCookie(w, s.Name(), gs.st.encodeCookie(s.Name(), state.tok, res.version), opts, gs.maxAge(opts, res.absolute, now))
			return nil
		case !errors.Is(err, errSessionGone):
			return gs.saveError(&sp, err)
		}
		st.markGone(st.key(state.tok))
		// Expired or destroyed since it was loaded: it is not brought back.
		// The values this request changed go to a new session.
		for k := range s.Values {
			if key, ok := k.(string); ok {
				if _, changed := set["v:"+key]; changed {
					continue
				}
			}
			delete(s.Values, k)
		}
		delete(set, fRemember)
		gs.reset(state, s)
	}
	if len(set) == 0 {
		if deadCookie {
			gs.setCookie(w, s.Name(), "", opts, -1)
			gs.reset(state, s)
		}
		return nil // an empty new session is not stored
	}
	return gs.create(sp.begin(st.b, ctx), &sp, w, s, state, set, opts, now)
}

// create stores a new session with set; sp is the save's span. Callers
// hold state.mu.
func (gs *GorillaStore) create(ctx context.Context, sp *saveSpan, w http.ResponseWriter, s *sessions.Session, state *gorillaState, set map[string][]byte, opts *sessions.Options, now time.Time) error {
	st := gs.st
	set[fRemember] = boolField(opts.MaxAge > 0)
	if state.userAgent != "" {
		set[fAgent] = []byte(state.userAgent)
	}
	abs := now.Add(st.cfg.Lifetime)
	for range 3 { // a collision of 280 random bits is not expected; retry anyway
		t := newToken("")
		res, err := st.runSave(ctx, st.key(t), st.key(t), gs.saveArgs("new", now, abs.UnixMilli(), true, set, nil))
		if errors.Is(err, errSessionCollision) {
			continue
		}
		if err != nil {
			return gs.saveError(sp, err)
		}
		st.saved()
		state.tok, state.hasToken, state.found, state.badCookie, state.rotated = t, true, true, false, false
		state.snapshot = make(map[string][]byte)
		gs.saved(state, res, set, nil)
		s.IsNew = false
		s.ID = t.handle()
		gs.setCookie(w, s.Name(), gs.st.encodeCookie(s.Name(), t, res.version), opts, gs.maxAge(opts, res.absolute, now))
		return nil
	}
	return gs.saveError(sp, errSessionCollision)
}

// saveArgs is SessionStore.saveArgs with the normal limits for every
// session: the gorilla API has no user binding, so its sessions are never
// treated as anonymous.
func (gs *GorillaStore) saveArgs(mode string, now time.Time, abs int64, bump bool, set map[string][]byte, del map[string]struct{}) []string {
	st := gs.st
	return st.saveArgsWith(st.cfg.IdleTimeout, st.cfg.MaxSize, mode, now, abs, bump, set, del)
}

// changes compares Values with the snapshot: the encoded values to set and
// the fields to delete.
func (gs *GorillaStore) changes(s *sessions.Session, state *gorillaState) (map[string][]byte, map[string]struct{}, error) {
	set := make(map[string][]byte)
	seen := make(map[string]struct{}, len(s.Values))
	for k, v := range s.Values {
		key, ok := k.(string)
		if !ok || checkValueKey(key) != nil {
			return nil, nil, fmt.Errorf("%w: %#v", ErrGorillaValueKey, k)
		}
		f := "v:" + key
		seen[f] = struct{}{}
		b, err := (GobCodec{}).Marshal(v)
		if err != nil {
			return nil, nil, fmt.Errorf("redisecho: session: encode %q (%T): %w", key, v, err)
		}
		if old, ok := state.snapshot[f]; !ok || string(old) != string(b) {
			set[f] = b
		}
	}
	var del map[string]struct{}
	for f := range state.snapshot {
		if _, ok := seen[f]; !ok {
			if del == nil {
				del = make(map[string]struct{})
			}
			del[f] = struct{}{}
		}
	}
	return set, del, nil
}

// saved records a successful save in state.
func (gs *GorillaStore) saved(state *gorillaState, res saveResult, set map[string][]byte, del map[string]struct{}) {
	for f, b := range set {
		if strings.HasPrefix(f, "v:") {
			state.snapshot[f] = b
		}
	}
	for f := range del {
		delete(state.snapshot, f)
	}
	state.version, state.absolute, state.remember = res.version, res.absolute, res.remember
}

// reset makes state a new session's, with no cookie of its own.
func (gs *GorillaStore) reset(state *gorillaState, s *sessions.Session) {
	state.tok, state.hasToken, state.badCookie, state.found, state.rotated = token{}, false, false, false, false
	state.snapshot, state.version, state.absolute = nil, 0, time.Time{}
	s.IsNew, s.ID = true, ""
}

// maxAge is the cookie's Max-Age for opts: MaxAge capped at the remaining
// lifetime, 0 for a browser-session cookie.
func (gs *GorillaStore) maxAge(opts *sessions.Options, absolute, now time.Time) int {
	if opts.MaxAge <= 0 {
		return 0
	}
	return min(opts.MaxAge, max(int(absolute.Sub(now).Round(time.Second)/time.Second), 1))
}

// setCookie sets the session cookie (maxAge < 0 clears it) with the
// session's options over the store's defaults.
func (gs *GorillaStore) setCookie(w http.ResponseWriter, name, value string, opts *sessions.Options, maxAge int) {
	cfg := &gs.st.cfg
	o := sessions.Options{
		Path: cfg.CookiePath, Domain: cfg.CookieDomain, MaxAge: maxAge,
		Secure: opts.Secure || !cfg.InsecureCookie, HttpOnly: true,
		Partitioned: opts.Partitioned, SameSite: cfg.SameSite,
	}
	if opts.Path != "" {
		o.Path = opts.Path
	}
	if opts.Domain != "" {
		o.Domain = opts.Domain
	}
	if opts.SameSite != 0 {
		o.SameSite = opts.SameSite
	}
	http.SetCookie(w, sessions.NewCookie(name, value, &o))
	h := w.Header()
	addVaryCookie(h)
	h.Set(echo.HeaderCacheControl, "no-store")
}

// stateOf returns the state of s, loaded by this store for r.
func (gs *GorillaStore) stateOf(r *http.Request, s *sessions.Session) *gorillaState {
	if s == nil {
		return nil
	}
	states := gorillaStatesOf(r, false)
	if states == nil {
		return nil
	}
	states.mu.Lock()
	defer states.mu.Unlock()
	if state := states.m[s]; state != nil && state.store == gs {
		return state
	}
	return nil
}

// saveError counts and logs a failed save (its span sp) and returns the
// error for the handler: 413 for a session over MaxSize, 503 otherwise.
func (gs *GorillaStore) saveError(sp *saveSpan, err error) error {
	gs.st.saveFailed(sp, err)
	if errors.Is(err, ErrSessionTooLarge) {
		return &echo.HTTPError{Code: http.StatusRequestEntityTooLarge, Message: "session too large", Internal: ErrSessionTooLarge}
	}
	return unavailableError(err)
}

func unavailableError(cause error) error {
	return &echo.HTTPError{
		Code: http.StatusServiceUnavailable, Message: "session store unavailable",
		Internal: fmt.Errorf("%w: %w", ErrSessionUnavailable, cause),
	}
}

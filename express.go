package redisecho

// The Express migration mode: sessions that an Express app using
// express-session 1.19 and connect-redis 9 shares with the Go app on one
// Redis, so that a user logged in on either side is logged in on both while
// an app moves route by route. The facts this file relies on (cookie
// signature, blob layout, TTLs) were read from those packages' source; the
// tests run against the real packages (internal/expressapp).
//
// The Redis side is one string per session, exactly as connect-redis keeps
// it: KeyPrefix + ID = JSON.stringify(session), with SET … EX. Go reads it
// without client-side caching (one GET and PTTL per request), merges its
// changes into the raw JSON keeping every other byte, and writes it back
// with a compare-and-set script.

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/redis/rueidis"
)

const (
	// DefaultExpressCookieName is express-session's default cookie name:
	// "connect.sid" (the guide's app sets "sessionId").
	DefaultExpressCookieName = "connect.sid"
	// DefaultExpressKeyPrefix is connect-redis's default key prefix:
	// "sess:" (the guide's app sets "session:").
	DefaultExpressKeyPrefix = "sess:"
	// DefaultExpressTTL is connect-redis's default ttl, used for sessions
	// whose cookie has no expiry: 24 h.
	DefaultExpressTTL = 24 * time.Hour
	// expressCASRetries bounds how often a save re-applies its changes when
	// another request changed the session meanwhile (each retry waits a
	// random moment of up to a millisecond per attempt made).
	expressCASRetries = 32
)

// ErrNotInExpressMode is returned by the session features that need data
// express-session does not keep (flashes, the user binding and its index,
// remember-me, handles): an Express session is only its JSON. Use values
// instead (req.session.userId is Get("userId")).
var ErrNotInExpressMode = errors.New("redisecho: session: not available for Express sessions")

// ExpressCookie is the cookie part of the Express app's session options
// (express-session's cookie: {...}); Go writes it into every session it
// creates and sends the same cookie.
type ExpressCookie struct {
	// MaxAge is cookie.maxAge: the session's lifetime, renewed by every
	// request that uses it. Default: 0, a browser-session cookie (no
	// Expires), stored for the Express store's TTL.
	MaxAge time.Duration
	// Path is cookie.path. Default: "/".
	Path string
	// Domain is cookie.domain. Default: none (host-only).
	Domain string
	// Secure is cookie.secure. Default: false (express-session's default;
	// set it in production, as the guide does).
	Secure bool
	// NoHTTPOnly is cookie.httpOnly: false. Default: false (HttpOnly, as
	// express-session's default).
	NoHTTPOnly bool
	// SameSite is cookie.sameSite. Default: none (express-session's
	// default; the guide sets 'lax', http.SameSiteLaxMode).
	SameSite http.SameSite
	// Rolling is express-session's rolling: every response to a request
	// with a session sends its cookie again with a fresh Expires, and
	// extends the session. Default: false.
	Rolling bool
}

// ExpressSessionConfig configures sessions shared with an Express app:
// set every field to what the Express app's session({...}) and
// RedisStore({...}) say.
type ExpressSessionConfig struct {
	// Client is the rueidis client. Required.
	Client rueidis.Client
	// Options is the shared plumbing: Timeout, Breaker, Clock and Logger,
	// with their defaults. Options.Prefix plays no part: the keys are
	// KeyPrefix + the session ID, as connect-redis writes them.
	Options
	// Skipper skips the middleware for a request. Default: never skip.
	Skipper middleware.Skipper
	// Secrets is express-session's secret, or its list in the same order:
	// the first signs, every one verifies (rotate by putting a new one
	// first on both sides). Short secrets are accepted, as Express accepts
	// them. Required.
	Secrets []string
	// CookieName is express-session's name. Default:
	// DefaultExpressCookieName ("connect.sid").
	CookieName string
	// KeyPrefix is connect-redis's prefix. Default: DefaultExpressKeyPrefix
	// ("sess:").
	KeyPrefix string
	// TTL is connect-redis's ttl: how long a session whose cookie has no
	// expiry (a browser-session cookie) is kept. Default: DefaultExpressTTL
	// (24 h).
	TTL time.Duration
	// Cookie is express-session's cookie options.
	Cookie ExpressCookie
	// UserIDKey is the session value that names the logged-in user, as a
	// JSON string or number (the guide's req.session.userId): UserID
	// returns it, so that features keyed by user (the realtime hub's
	// streams and presence, UserOrIPKey) see Express logins. "-" means
	// none. Default: "userId".
	UserIDKey string
	// MaxSize bounds a session's stored JSON, in bytes: a change that
	// would make it larger is refused with 413. Default: 64 KiB.
	MaxSize int
	// AllowSharedCaching leaves the caching headers of responses alone. By
	// default a response whose handler read an existing session gets
	// "Cache-Control: private" and "Vary: Cookie". Default: false.
	AllowSharedCaching bool
	// Degrade runs handlers with an empty session that is never saved when
	// Redis is down, instead of answering 503. Default: false.
	Degrade bool
}

// ExpressSession returns the middleware for sessions shared with an
// Express app whose express-session signs with secrets, with the other
// fields of ExpressSessionConfig at their defaults. It panics when the
// configuration is invalid.
func ExpressSession(client rueidis.Client, secrets ...string) echo.MiddlewareFunc {
	return ExpressSessionWithConfig(ExpressSessionConfig{Client: client, Secrets: secrets})
}

// ExpressSessionWithConfig returns the middleware for cfg. It panics when
// cfg is invalid; use ToMiddleware to get the error instead.
func ExpressSessionWithConfig(cfg ExpressSessionConfig) echo.MiddlewareFunc {
	return must(cfg.ToMiddleware())
}

// ToMiddleware validates cfg, fills its defaults and returns the
// middleware. It does no I/O.
func (cfg ExpressSessionConfig) ToMiddleware() (echo.MiddlewareFunc, error) {
	st, err := NewExpressSessionStore(cfg)
	if err != nil {
		return nil, err
	}
	return st.Middleware(), nil
}

// expressMode is what a SessionStore in Express mode adds.
type expressMode struct {
	secrets [][]byte
	userKey string // "v:" + UserIDKey, or "" for none
	prefix  string
	ttl     time.Duration
	cookie  ExpressCookie
	// badBlobs remembers the keys whose unreadable blob was logged, so
	// that each is logged once (bounded: forgotten when full).
	badBlobs  sync.Map
	badBlobsN atomic.Int64
}

// NewExpressSessionStore validates cfg, fills its defaults and returns a
// SessionStore in Express mode, whose middleware GetSession and the
// SessionState methods serve as in the native mode. It does no I/O.
func NewExpressSessionStore(cfg ExpressSessionConfig) (*SessionStore, error) {
	if len(cfg.Secrets) == 0 {
		return nil, ErrNoSessionKeys
	}
	x := &expressMode{prefix: cfg.KeyPrefix, ttl: cfg.TTL, cookie: cfg.Cookie}
	for i, s := range cfg.Secrets {
		if s == "" {
			return nil, fmt.Errorf("%w: secret %d is empty", ErrInvalidSessionConfig, i)
		}
		x.secrets = append(x.secrets, []byte(s))
	}
	if x.prefix == "" {
		x.prefix = DefaultExpressKeyPrefix
	}
	switch cfg.UserIDKey {
	case "":
		x.userKey = "v:userId"
	case "-":
	default:
		x.userKey = "v:" + cfg.UserIDKey
	}
	if x.ttl == 0 {
		x.ttl = DefaultExpressTTL
	}
	if x.cookie.Path == "" {
		x.cookie.Path = "/"
	}
	switch {
	case x.ttl < time.Second:
		return nil, fmt.Errorf("%w: TTL %v is under 1 s", ErrInvalidSessionConfig, x.ttl)
	case x.cookie.MaxAge < 0 || x.cookie.MaxAge > 0 && x.cookie.MaxAge < time.Second:
		return nil, fmt.Errorf("%w: Cookie.MaxAge %v is under 1 s", ErrInvalidSessionConfig, x.cookie.MaxAge)
	}
	if cfg.CookieName == "" {
		cfg.CookieName = DefaultExpressCookieName
	}
	if cfg.MaxSize == 0 {
		cfg.MaxSize = DefaultSessionMaxSize
	}
	if cfg.MaxSize < 0 {
		return nil, fmt.Errorf("%w: MaxSize %d", ErrInvalidSessionConfig, cfg.MaxSize)
	}
	// The native store's checks and defaults, for the parts both modes
	// share; its key ring is unused.
	st, err := NewSessionStore(SessionConfig{
		Client: cfg.Client, Options: cfg.Options, Skipper: cfg.Skipper, Keys: []string{strings.Repeat("x", 32)},
		CookieName: cfg.CookieName, CookiePath: x.cookie.Path, CookieDomain: x.cookie.Domain,
		InsecureCookie: !x.cookie.Secure, SameSite: x.cookie.SameSite, MaxSize: cfg.MaxSize, AnonymousMaxSize: cfg.MaxSize,
		AllowSharedCaching: cfg.AllowSharedCaching, Codec: expressCodec{}, Degrade: cfg.Degrade,
	})
	if err != nil {
		return nil, err
	}
	if x.cookie.SameSite == 0 {
		st.cfg.SameSite = 0
	}
	st.keys = nil
	st.x = x
	return st, nil
}

// expressCodec is JSON as Express writes it: no HTML escaping.
type expressCodec struct{}

func (expressCodec) Marshal(v any) ([]byte, error) { return marshalJS(v) }

func (expressCodec) Unmarshal(data []byte, v any) error { return JSONCodec{}.Unmarshal(data, v) }

// marshalJS encodes v as JSON.stringify would for the values that matter:
// '<', '>' and '&' unescaped; U+2028 and U+2029 unescaped too, as JS
// writes them (encoding/json always escapes them).
func marshalJS(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	b := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	if bytes.Contains(b, []byte(`\u202`)) {
		b = unescapeLineSeparators(b)
	}
	return b, nil
}

// unescapeLineSeparators turns the \u2028 and \u2029 escapes of encoding/json
// back into the characters, outside of escaped backslashes.
func unescapeLineSeparators(b []byte) []byte {
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		if b[i] == '\\' && i+1 < len(b) {
			if b[i+1] == 'u' && i+5 < len(b) && string(b[i+2:i+5]) == "202" && (b[i+5] == '8' || b[i+5] == '9') {
				out = append(out, "\u2028"...)
				if b[i+5] == '9' {
					out[len(out)-1] = 0xa9
				}
				i += 5
				continue
			}
			out = append(out, b[i], b[i+1])
			i++
			continue
		}
		out = append(out, b[i])
	}
	return out
}

// jsString encodes s as JSON.stringify does: only '"', '\\' and control
// characters escaped.
func jsString(s string) []byte {
	b, _ := marshalJS(s) // a string always encodes
	return b
}

// sign is cookie-signature 1.0.7's sign: value + "." + the unpadded
// standard base64 of HMAC-SHA256(secret, value).
func (x *expressMode) sign(value string, secret []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(value))
	return value + "." + base64.RawStdEncoding.EncodeToString(m.Sum(nil))
}

// unsign returns the session ID of a cookie value as express-session reads
// it ("s:" + signed ID, URI-decoded when it holds '%'), verified by any
// secret; ok is false for an unsigned, malformed or wrongly signed value.
func (x *expressMode) unsign(raw string) (id string, ok bool) {
	if strings.Contains(raw, "%") {
		if dec, err := url.PathUnescape(raw); err == nil {
			raw = dec
		}
	}
	signed, found := strings.CutPrefix(raw, "s:")
	if !found || len(signed) > 512 {
		return "", false
	}
	dot := strings.LastIndexByte(signed, '.')
	if dot <= 0 {
		return "", false
	}
	id = signed[:dot]
	if !validExpressID(id) {
		return "", false
	}
	for _, secret := range x.secrets {
		if hmac.Equal([]byte(x.sign(id, secret)), []byte(signed)) {
			return id, true
		}
	}
	return "", false
}

// validExpressID accepts what may follow the key prefix: express-session's
// IDs are 32 characters of base64url, and a custom genid's are bounded here
// to 1–128 bytes of printable ASCII without spaces.
func validExpressID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] <= ' ' || id[i] > '~' {
			return false
		}
	}
	return true
}

// newExpressID is uid-safe's uid(24), as express-session generates IDs: 24
// random bytes in unpadded base64url.
func newExpressID() string {
	var b [24]byte
	_, _ = rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// cookieValue is the Set-Cookie value express-session writes for id:
// encodeURIComponent("s:" + signed ID).
func (x *expressMode) cookieValue(id string) string {
	return encodeURIComponent("s:" + x.sign(id, x.secrets[0]))
}

// encodeURIComponent is JavaScript's: every byte outside A-Z a-z 0-9 and
// -_.!~*'() is percent-encoded (upper-case hex).
func encodeURIComponent(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || strings.IndexByte("-_.!~*'()", c) >= 0 {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}

// cookieJSON is the stored cookie object of a session Go creates at now,
// in Cookie#toJSON's field order.
func (x *expressMode) cookieJSON(now time.Time) []byte {
	var b bytes.Buffer
	b.WriteString(`{"originalMaxAge":`)
	if x.cookie.MaxAge > 0 {
		b.WriteString(strconv.FormatInt(x.cookie.MaxAge.Milliseconds(), 10))
		b.WriteString(`,"expires":"`)
		b.WriteString(now.Add(x.cookie.MaxAge).UTC().Format("2006-01-02T15:04:05.000Z"))
		b.WriteString(`"`)
	} else {
		b.WriteString(`null,"expires":null`)
	}
	fmt.Fprintf(&b, `,"secure":%t,"httpOnly":%t`, x.cookie.Secure, !x.cookie.NoHTTPOnly)
	if x.cookie.Domain != "" {
		b.WriteString(`,"domain":`)
		b.Write(jsString(x.cookie.Domain))
	}
	b.WriteString(`,"path":`)
	b.Write(jsString(x.cookie.Path))
	switch x.cookie.SameSite {
	case http.SameSiteLaxMode:
		b.WriteString(`,"sameSite":"lax"`)
	case http.SameSiteStrictMode:
		b.WriteString(`,"sameSite":"strict"`)
	case http.SameSiteNoneMode:
		b.WriteString(`,"sameSite":"none"`)
	}
	b.WriteString(`}`)
	return b.Bytes()
}

// jsonMember is one top-level member of a session's JSON, with its key
// and value exactly as stored.
type jsonMember struct {
	key    string
	rawKey []byte
	value  []byte
}

// parseSessionJSON splits a stored session into its top-level members, in
// order. It fails unless the blob is one JSON object holding a "cookie"
// object (express-session answers 500 without it).
func parseSessionJSON(blob []byte) ([]jsonMember, error) {
	dec := json.NewDecoder(bytes.NewReader(blob))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	var members []jsonMember
	hasCookie := false
	for dec.More() {
		start := dec.InputOffset()
		t, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, ok := t.(string)
		if !ok {
			return nil, errors.New("not a JSON object")
		}
		rawKey := bytes.TrimLeft(blob[start:dec.InputOffset()], " \t\r\n,")
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		// A repeated key (two lone surrogates both decode to U+FFFD) is
		// kept as it is; the last one is its value, as for JSON.parse.
		if key == "cookie" {
			hasCookie = len(v) > 0 && v[0] == '{'
		}
		members = append(members, jsonMember{key: key, rawKey: rawKey, value: v})
	}
	if t, err := dec.Token(); err != nil || t != json.Delim('}') {
		return nil, errors.New("not a JSON object")
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data after the JSON object")
	}
	if !hasCookie {
		return nil, errors.New(`no "cookie" object`)
	}
	return members, nil
}

// reservedExpressKey reports the keys a Go Set or Delete may not touch:
// the cookie object, the names express-session's Session drops or owns on
// load (its methods, id, req, and what every JavaScript object inherits),
// and keys that are not UTF-8.
func reservedExpressKey(key string) bool {
	switch key {
	case "cookie", "id", "req", "touch", "resetMaxAge", "save", "reload", "destroy", "regenerate",
		// What every JavaScript object inherits: express-session copies a
		// stored key only if the session object does not have it already.
		"__proto__", "constructor", "toString", "toLocaleString", "valueOf", "hasOwnProperty", "isPrototypeOf",
		"propertyIsEnumerable", "__defineGetter__", "__defineSetter__", "__lookupGetter__", "__lookupSetter__":
		return true
	}
	return !utf8.ValidString(key) // it would be stored as U+FFFD, another key
}

// mergeSession applies the session's pending changes to the members of a
// stored blob (nil: a new session, with cookie as its cookie object) and
// returns the JSON to store: every member Go did not change keeps its
// bytes and place; changed values keep their place; new keys follow, in
// key order.
func (s *SessionState) mergeSession(members []jsonMember, cookie []byte) []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	n := 0
	member := func(rawKey, value []byte) {
		if n > 0 {
			b.WriteByte(',')
		}
		n++
		b.Write(rawKey)
		b.WriteByte(':')
		b.Write(value)
	}
	if members == nil {
		member([]byte(`"cookie"`), cookie)
	}
	present := make(map[string]bool, len(members))
	for _, m := range members {
		present[m.key] = true
		f := "v:" + m.key
		switch {
		case m.key == "cookie":
			member(m.rawKey, m.value)
		case s.set[f] != nil:
			member(m.rawKey, s.set[f])
		case s.clear:
		default:
			if _, gone := s.del[f]; !gone {
				member(m.rawKey, m.value)
			}
		}
	}
	var added []string
	for f := range s.set {
		if k, ok := strings.CutPrefix(f, "v:"); ok && !present[k] {
			added = append(added, k)
		}
	}
	slices.Sort(added)
	for _, k := range added {
		member(jsString(k), s.set["v:"+k])
	}
	b.WriteByte('}')
	return b.Bytes()
}

// expressSizes is the size of the JSON a save would store with the
// pending changes (cur), and with field = b too (size): MaxSize counts
// the stored JSON, byte for byte. Callers hold s.mu and have loaded the
// session.
func (s *SessionState) expressSizes(field string, b []byte) (cur, size int) {
	var cookie []byte
	members := s.data.members
	if !s.found {
		members, cookie = nil, s.st.x.cookieJSON(s.st.b.clock.Now())
	}
	if s.set == nil {
		s.set = make(map[string][]byte)
	}
	old, had := s.set[field]
	_, deleted := s.del[field]
	cur = len(s.mergeSession(members, cookie))
	s.set[field] = b
	delete(s.del, field)
	size = len(s.mergeSession(members, cookie))
	if had {
		s.set[field] = old
	} else {
		delete(s.set, field)
	}
	if deleted {
		s.del[field] = struct{}{}
	}
	return cur, size
}

// newExpressSession reads the request's cookie: the first cookie of the
// name that verifies names the session (express-session reads only the
// first; a later valid one is tried only if the first names no session).
func (st *SessionStore) newExpressSession(r *http.Request) *SessionState {
	s := &SessionState{st: st, ctx: r.Context()}
	cookies, more := sessionCookies(r, st.cfg.CookieName)
	if len(cookies) == 0 {
		return s // a new session, read with no I/O (ensureLoaded)
	}
	for _, ck := range cookies {
		id, ok := st.x.unsign(ck.Value)
		switch {
		case !ok:
		case s.hasToken:
			s.xspare = append(s.xspare, id)
		default:
			s.xid, s.key, s.hasToken = id, st.x.prefix+id, true
		}
	}
	if !s.hasToken {
		s.badCookie, s.invalid = !more, true
	}
	return s
}

// loadExpress reads the session's blob and TTL (uncached: every request
// sees the last write of any instance or of Express). Callers hold s.mu.
func (s *SessionState) loadExpress() {
	st := s.st
	for {
		d, found, err := st.readExpress(s.ctx, s.key)
		if err != nil {
			if s.ctx.Err() == nil {
				st.b.log.Error("redisecho: session: load failed", err)
				st.b.observe(Observation{Kind: ObsSessionError, N: 1})
			}
			if st.cfg.Degrade {
				s.degraded = true
			} else {
				s.err = fmt.Errorf("%w: %w", ErrSessionUnavailable, err)
			}
			return
		}
		if found {
			s.found, s.data = true, d
			s.userID = st.x.userOf(d.fields)
			st.b.observe(Observation{Kind: ObsSessionLoad, Result: ResultRedis, N: 1}) // never cached
			return
		}
		if len(s.xspare) == 0 {
			st.b.observe(Observation{Kind: ObsSessionLoad, Result: ResultNew, N: 1})
			return
		}
		s.xid, s.key, s.xspare = s.xspare[0], st.x.prefix+s.xspare[0], s.xspare[1:]
	}
}

// userOf is the user a session's values name (UserIDKey), or "".
func (x *expressMode) userOf(fields map[string]string) string {
	raw, ok := fields[x.userKey]
	if x.userKey == "" || !ok {
		return ""
	}
	var v any
	d := json.NewDecoder(strings.NewReader(raw))
	d.UseNumber()
	if d.Decode(&v) != nil {
		return ""
	}
	switch v := v.(type) {
	case string:
		if len(v) <= MaxUserIDLength {
			return v
		}
	case json.Number:
		return v.String()
	}
	return ""
}

// readExpress reads key's blob and its remaining TTL in one round trip.
// A blob that is not a session (not JSON, no cookie object) is missing,
// logged once.
func (st *SessionStore) readExpress(ctx context.Context, key string) (d sessionData, found bool, err error) {
	st.loads.Add(1)
	res := st.b.DoMulti(ctx, key, st.b.client.B().Get().Key(key).Build(), st.b.client.B().Pttl().Key(key).Build())
	blob, err := res[0].AsBytes()
	if rueidis.IsRedisNil(err) {
		return d, false, nil
	}
	if err != nil {
		return d, false, err
	}
	pttl, err := res[1].AsInt64()
	if err != nil {
		return d, false, err
	}
	members, perr := parseSessionJSON(blob)
	if perr != nil {
		if _, logged := st.x.badBlobs.LoadOrStore(key, true); !logged {
			if st.x.badBlobsN.Add(1) > 10000 {
				st.x.badBlobs.Clear()
				st.x.badBlobsN.Store(0)
			}
			st.b.log.logger.Warn("redisecho: session: the stored Express session is not session JSON; treating it as missing", "error", perr)
		}
		return d, false, nil
	}
	d.fields = make(map[string]string, len(members))
	for _, m := range members {
		if m.key != "cookie" {
			d.fields["v:"+m.key] = string(m.value)
		}
	}
	d.blob, d.members, d.pttl = blob, members, pttl
	return d, true, nil
}

// expressTTL is how long a session whose members are these (nil: a new
// session) is kept from a save, and whether its cookie is persistent: its
// cookie object's originalMaxAge when that is a number (express-session
// resets expires to now + originalMaxAge before connect-redis computes the
// TTL), else (null or false: a browser-session cookie, which an Express
// app may choose per session) the store's TTL. A new session follows the
// configured Cookie.MaxAge.
func (x *expressMode) expressTTL(members []jsonMember) (ttl time.Duration, persistent bool) {
	if members == nil {
		if x.cookie.MaxAge > 0 {
			return x.cookie.MaxAge, true
		}
		return x.ttl, false
	}
	for _, m := range members {
		if m.key != "cookie" {
			continue
		}
		var c struct {
			OriginalMaxAge json.RawMessage `json:"originalMaxAge"`
		}
		if json.Unmarshal(m.value, &c) == nil {
			if ms, err := strconv.ParseFloat(string(c.OriginalMaxAge), 64); err == nil && ms >= 1000 {
				return time.Duration(ms) * time.Millisecond, true
			}
		}
		break
	}
	return x.ttl, false
}

// expressSaveScript writes a session if it is still what the save read.
//
// KEYS[1] the session's key. ARGV[1] mode: "new" (the key must not
// exist), "put" (written whatever it holds: a regenerated session's new
// key, which only this request knows), "update" (the value must still be
// ARGV[2]), "delete" (deleted if its value is still ARGV[2]: a
// regenerated session's old key) or "touch" (the key must exist; only its
// TTL changes); ARGV[2] the value read, ARGV[3] the value to write,
// ARGV[4] the TTL in ms (as connect-redis's EX, which Express refreshes on
// every save and touch). Returns {"OK"}, {"GONE"} (the session no longer
// exists), {"EXISTS"} (a new ID is taken) or {"CHANGED", current value}.
var expressSaveScript = newPipelinedScript(`
local mode = ARGV[1]
local cur = redis.call('GET', KEYS[1])
if mode == 'new' then
  if cur then return {'EXISTS'} end
elseif mode == 'put' then
elseif not cur then
  return {'GONE'}
elseif mode == 'touch' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'OK'}
elseif cur ~= ARGV[2] then
  return {'CHANGED', cur}
elseif mode == 'delete' then
  redis.call('DEL', KEYS[1])
  return {'OK'}
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return {'OK'}
`)

var (
	errExpressGone    = errors.New("redisecho: session: gone")
	errExpressExists  = errors.New("redisecho: session: ID taken")
	errExpressChanged = errors.New("redisecho: session: changed meanwhile")
)

// writeExpress runs expressSaveScript; on errExpressChanged it returns the
// current value.
func (st *SessionStore) writeExpress(ctx context.Context, key, mode string, old, value []byte, ttl time.Duration) ([]byte, error) {
	res := st.b.ExecMulti(ctx, key, expressSaveScript, rueidis.LuaExec{
		Keys: []string{key},
		Args: []string{mode, string(old), string(value), strconv.FormatInt(max(ttl.Milliseconds(), 1), 10)},
	})[0]
	vals, status, err := statusReply(res)
	if err != nil {
		return nil, err
	}
	switch status {
	case "OK":
		return nil, nil
	case "GONE":
		return nil, errExpressGone
	case "EXISTS":
		return nil, errExpressExists
	case "CHANGED":
		if len(vals) == 2 {
			cur, err := vals[1].AsBytes()
			if err == nil {
				return cur, errExpressChanged
			}
		}
	}
	return nil, fmt.Errorf("redisecho: session: unexpected reply %v", vals)
}

// saveExpress writes the pending changes of an Express session and tells
// what cookie to send (nil: none), its span sp started before its first
// write. Callers hold s.mu.
func (s *SessionState) saveExpress(sp *saveSpan) (*sessionCookie, *sessionFailure) {
	s.committed = true
	st, x := s.st, s.st.x
	if s.degraded || s.err != nil {
		return nil, nil
	}
	ctx := context.WithoutCancel(s.ctx)
	now := st.b.clock.Now()
	clearCookie := &sessionCookie{maxAge: -1}
	if s.destroy {
		if !s.hasToken {
			if s.badCookie {
				return clearCookie, nil
			}
			return nil, nil
		}
		if len(s.xspare) > 0 {
			s.ensureLoaded() // several cookies verified: end the live one, not a planted one
		}
		if err := st.delExpress(sp.begin(st.b, ctx), s.key); err != nil {
			return nil, st.saveFailed(sp, err)
		}
		st.saved()
		return clearCookie, nil
	}
	dirty := len(s.set) > 0 || len(s.del) > 0 || s.clear || s.regenerate
	if dirty && s.hasToken {
		s.ensureLoaded() // the merge needs the stored JSON
		if s.err != nil {
			return nil, st.saveFailed(sp, s.err)
		}
		if s.degraded {
			return nil, nil
		}
	}
	if !dirty {
		// Express's store.touch on every request: the session slides
		// (here once a quarter of it has passed, or always with Rolling,
		// which re-sends the cookie too). A bad cookie, or one naming no
		// session, is left alone, as express-session leaves it: clearing
		// it could delete a valid cookie of the same name that a parallel
		// login just set.
		if !s.found || !x.cookie.Rolling && !s.expressTouchDue() {
			return nil, nil
		}
		ttl, persistent := x.expressTTL(s.data.members)
		if _, err := st.writeExpress(sp.begin(st.b, ctx), s.key, "touch", nil, nil, ttl); err != nil {
			if !errors.Is(err, errExpressGone) {
				st.b.log.Error("redisecho: session: extending the session failed", err)
				st.saveErrored()
				sp.fail(err)
			}
			return nil, nil
		}
		st.saved() // a touch is a save, as the native mode's
		if x.cookie.Rolling {
			return x.cookieFor(s.xid, ttl, persistent), nil
		}
		return nil, nil
	}
	if s.hasToken && s.found {
		members, blob := s.data.members, s.data.blob
		if s.regenerate {
			return s.regenerateExpress(ctx, sp, members, blob)
		}
		for attempt := range expressCASRetries {
			if attempt > 0 {
				time.Sleep(time.Duration(mrand.Int64N(int64(attempt) * int64(time.Millisecond))))
			}
			value := s.mergeSession(members, nil)
			if len(value) > st.cfg.MaxSize && len(value) > len(blob) {
				sp.fail(ErrSessionTooLarge)
				return nil, failTooLarge // (one already over the bound may shrink)
			}
			ttl, persistent := x.expressTTL(members)
			ctx = sp.begin(st.b, ctx)
			cur, err := st.writeExpress(ctx, s.key, "update", blob, value, ttl)
			switch {
			case err == nil:
				st.saved()
				return x.cookieFor(s.xid, ttl, persistent), nil
			case errors.Is(err, errExpressChanged):
				// Another request (Go or Express) saved meanwhile: apply
				// this request's changes to what it wrote.
				if m, perr := parseSessionJSON(cur); perr == nil {
					members, blob = m, cur
					continue
				}
				// Overwritten with something that is no session: gone.
				return nil, nil
			case errors.Is(err, errExpressGone):
				// Destroyed, expired or regenerated meanwhile (a logout
				// elsewhere must stick): nothing is written, and no
				// cookie is sent (a clearing one could delete the cookie
				// of the login that regenerated it).
				return nil, nil
			default:
				return nil, st.saveFailed(sp, err)
			}
		}
		return nil, st.saveFailed(sp, errExpressChanged)
	}
	// A new session: only if it holds a value (saveUninitialized: false).
	if !slices.ContainsFunc(slices.Collect(maps.Keys(s.set)), isDataField) {
		return nil, nil
	}
	value := s.mergeSession(nil, x.cookieJSON(now))
	if len(value) > st.cfg.MaxSize {
		return nil, failTooLarge
	}
	ttl, persistent := x.expressTTL(nil)
	ctx = sp.begin(st.b, ctx)
	for range 3 {
		id := newExpressID()
		_, err := st.writeExpress(ctx, x.prefix+id, "new", nil, value, ttl)
		if errors.Is(err, errExpressExists) {
			continue
		}
		if err != nil {
			return nil, st.saveFailed(sp, err)
		}
		st.saved()
		s.xid, s.key, s.hasToken, s.found = id, x.prefix+id, true, true
		return x.cookieFor(id, ttl, persistent), nil
	}
	return nil, st.saveFailed(sp, errExpressExists)
}

// delExpress deletes a session's key.
func (st *SessionStore) delExpress(ctx context.Context, key string) error {
	return st.b.Do(ctx, key, st.b.client.B().Del().Key(key).Build()).Error()
}

// dropNewExpress deletes the new key of a regeneration that did not
// complete, so that it does not outlive it; a failure is logged.
func (st *SessionStore) dropNewExpress(ctx context.Context, key string) {
	if err := st.delExpress(ctx, key); err != nil {
		st.b.log.Error("redisecho: session: deleting a regenerated session's new ID failed", err)
	}
}

// regenerateExpress moves the session to a new ID with this request's
// changes: the new key is written first, then the old one deleted if it
// still holds what this request read (the two live in different slots on
// a cluster, so no script can do both); if another request changed it
// meanwhile, its changes are merged into the new key and the delete is
// tried again; if it was destroyed meanwhile, the new key goes too.
// sp is the save's span. Callers hold s.mu.
func (s *SessionState) regenerateExpress(ctx context.Context, sp *saveSpan, members []jsonMember, blob []byte) (*sessionCookie, *sessionFailure) {
	st, x := s.st, s.st.x
	var id string
	mode := "new"
	for attempt := 0; ; attempt++ {
		value := s.mergeSession(members, nil)
		if len(value) > st.cfg.MaxSize && len(value) > len(blob) {
			if mode == "put" {
				st.dropNewExpress(ctx, x.prefix+id)
			}
			sp.fail(ErrSessionTooLarge)
			return nil, failTooLarge
		}
		ttl, persistent := x.expressTTL(members)
		if mode == "new" {
			id = newExpressID()
		}
		ctx = sp.begin(st.b, ctx)
		_, err := st.writeExpress(ctx, x.prefix+id, mode, nil, value, ttl)
		if errors.Is(err, errExpressExists) && attempt < 3 {
			continue
		}
		if err != nil {
			return nil, st.saveFailed(sp, err)
		}
		mode = "put"
		cur, err := st.writeExpress(ctx, s.key, "delete", blob, nil, ttl)
		switch {
		case err == nil:
			st.saved()
			s.xid, s.key = id, x.prefix+id
			return x.cookieFor(id, ttl, persistent), nil
		case errors.Is(err, errExpressChanged) && attempt < expressCASRetries:
			time.Sleep(time.Duration(mrand.Int64N(int64(attempt+1) * int64(time.Millisecond))))
			if m, perr := parseSessionJSON(cur); perr == nil {
				members, blob = m, cur
				continue
			}
			err = errExpressGone
		}
		// Gone meanwhile (a logout elsewhere must stick), or an error: the
		// new key must not outlive this.
		st.dropNewExpress(ctx, x.prefix+id)
		if errors.Is(err, errExpressGone) {
			// Another request regenerated or destroyed it first (a
			// double-submitted login): its cookie stands.
			return nil, nil
		}
		return nil, st.saveFailed(sp, err)
	}
}

// expressAlive returns a check that the session still exists (one
// uncached EXISTS), for streams that must end with it; nil for a session
// not stored. Callers hold s.mu and have loaded the session.
func (s *SessionState) expressAlive() func(ctx context.Context) (bool, error) {
	if !s.found {
		return nil
	}
	st, key := s.st, s.key
	return func(ctx context.Context) (bool, error) {
		n, err := st.b.Do(ctx, key, st.b.client.B().Exists().Key(key).Build()).AsInt64()
		return n == 1, err
	}
}

// expressTouchDue: a read that changes nothing extends the session (as
// Express's touch does on every request) once a quarter of its TTL has
// passed, so that most reads write nothing.
func (s *SessionState) expressTouchDue() bool {
	ttl, _ := s.st.x.expressTTL(s.data.members)
	return s.data.pttl >= 0 && time.Duration(s.data.pttl)*time.Millisecond < ttl-ttl/4
}

// cookieFor is the cookie for session id, as express-session sets it:
// Expires = now + the session's own max age, or none for a
// browser-session cookie.
func (x *expressMode) cookieFor(id string, ttl time.Duration, persistent bool) *sessionCookie {
	ck := &sessionCookie{value: x.cookieValue(id)}
	if persistent {
		ck.maxAge = int(ttl / time.Second)
		ck.expires = true
	}
	return ck
}

// writeExpressCookie adds the Set-Cookie of ck, with the attributes
// express-session writes.
func (x *expressMode) writeExpressCookie(h http.Header, name string, ck *sessionCookie, now time.Time) {
	c := &http.Cookie{Name: name, Value: ck.value, Path: x.cookie.Path, Domain: x.cookie.Domain,
		Secure: x.cookie.Secure, HttpOnly: !x.cookie.NoHTTPOnly, SameSite: x.cookie.SameSite}
	switch {
	case ck.maxAge < 0:
		// As res.clearCookie: an empty value that expired in 1970.
		c.Value, c.Expires = "", time.Unix(0, 0)
	case ck.expires:
		c.Expires = now.Add(time.Duration(ck.maxAge) * time.Second)
	}
	h.Add(echo.HeaderSetCookie, c.String())
}

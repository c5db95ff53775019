package redisecho

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"encoding/gob"
	"errors"

	"github.com/gorilla/sessions"
	"github.com/labstack/echo-contrib/session"
	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var (
	testKey    = strings.Repeat("k", 32)
	testOldKey = strings.Repeat("o", 32)
)

// sessionApp is one application instance with the session middleware and
// routes that exercise it.
type sessionApp struct {
	store *SessionStore
	srv   *httptest.Server
}

// newSessionApp starts an instance on client. mod adjusts the config.
func newSessionApp(t *testing.T, r *testRedis, client rueidis.Client, mod func(*SessionConfig)) *sessionApp {
	t.Helper()
	cfg := SessionConfig{Client: client, Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()}}
	if mod != nil {
		mod(&cfg)
	}
	store, err := NewSessionStore(cfg)
	require.NoError(t, err)
	e := echo.New()
	e.HideBanner = true
	e.Use(store.Middleware())
	sess := func(c echo.Context) *SessionState {
		s, err := GetSession(c)
		require.NoError(t, err)
		return s
	}
	e.GET("/get", func(c echo.Context) error {
		var v any
		ok, err := sess(c).Get(c.QueryParam("k"), &v)
		if err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]any{"found": ok, "value": v})
	})
	e.GET("/all", func(c echo.Context) error {
		s := sess(c)
		out := map[string]any{}
		for _, k := range s.Keys() {
			var v any
			_, _ = s.Get(k, &v)
			out[k] = v
		}
		return c.JSON(http.StatusOK, out)
	})
	e.POST("/set", func(c echo.Context) error {
		if err := sess(c).Set(c.QueryParam("k"), c.QueryParam("v")); err != nil {
			return c.JSON(http.StatusBadRequest, map[string]string{"error": err.Error()})
		}
		return c.JSON(http.StatusOK, map[string]string{"ok": "yes"})
	})
	e.POST("/set-silent", func(c echo.Context) error { // writes no response
		return sess(c).Set(c.QueryParam("k"), c.QueryParam("v"))
	})
	e.POST("/delete", func(c echo.Context) error {
		require.NoError(t, sess(c).Delete(c.QueryParam("k")))
		return c.NoContent(http.StatusNoContent)
	})
	e.POST("/login", func(c echo.Context) error {
		s := sess(c)
		require.NoError(t, s.Regenerate())
		require.NoError(t, s.SetUserID(c.QueryParam("user")))
		return c.JSON(http.StatusOK, map[string]string{"message": "Login successful"})
	})
	e.POST("/clear", func(c echo.Context) error {
		s := sess(c)
		require.NoError(t, s.Clear())
		require.Empty(t, s.Keys(), "cleared at once in this request")
		if v := c.QueryParam("then"); v != "" {
			require.NoError(t, s.Set("after", v))
		}
		return c.NoContent(http.StatusNoContent)
	})
	e.POST("/regenerate", func(c echo.Context) error {
		require.NoError(t, sess(c).Regenerate())
		return c.NoContent(http.StatusNoContent)
	})
	e.POST("/destroy", func(c echo.Context) error {
		require.NoError(t, sess(c).Destroy())
		return c.NoContent(http.StatusNoContent)
	})
	e.POST("/flash", func(c echo.Context) error {
		require.NoError(t, sess(c).SetFlash("notice", c.QueryParam("v")))
		return c.NoContent(http.StatusNoContent)
	})
	e.GET("/flash", func(c echo.Context) error {
		var v string
		ok, err := sess(c).Flash("notice", &v)
		require.NoError(t, err)
		return c.JSON(http.StatusOK, map[string]any{"found": ok, "value": v})
	})
	whoami := func(c echo.Context) error {
		s := sess(c)
		return c.JSON(http.StatusOK, map[string]string{"user": s.UserID(), "handle": s.Handle()})
	}
	e.GET("/whoami", whoami)
	e.GET("/sub/whoami", whoami) // a sub-path, where a sibling site may plant cookies
	e.POST("/unbind", func(c echo.Context) error {
		require.NoError(t, sess(c).SetUserID(""))
		return c.NoContent(http.StatusNoContent)
	})
	e.GET("/untouched", func(c echo.Context) error { return c.String(http.StatusOK, "static") })
	e.POST("/late", func(c echo.Context) error {
		require.NoError(t, c.String(http.StatusOK, "done"))
		require.ErrorIs(t, sess(c).Set("late", "x"), ErrSessionCommitted)
		return nil
	})
	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)
	return &sessionApp{store: store, srv: srv}
}

// browser is an HTTP client with a cookie jar. The test server is plain
// HTTP, so the jar is told the cookie is fine to send back.
type browser struct {
	t   *testing.T
	hc  *http.Client
	jar *cookiejar.Jar
}

func newBrowser(t *testing.T) *browser {
	jar, err := cookiejar.New(nil)
	require.NoError(t, err)
	return &browser{t: t, hc: &http.Client{Jar: insecureJar{jar}}, jar: jar}
}

// insecureJar sends Secure cookies over the plain-HTTP test server.
type insecureJar struct{ *cookiejar.Jar }

func (j insecureJar) Cookies(u *url.URL) []*http.Cookie {
	s := *u
	s.Scheme = "https"
	return j.Jar.Cookies(&s)
}

func (j insecureJar) SetCookies(u *url.URL, cookies []*http.Cookie) {
	s := *u
	s.Scheme = "https"
	j.Jar.SetCookies(&s, cookies)
}

type reply struct {
	code   int
	header http.Header
	body   string
}

func (b *browser) do(method, url string) reply {
	b.t.Helper()
	req, err := http.NewRequest(method, url, nil)
	require.NoError(b.t, err)
	resp, err := b.hc.Do(req)
	require.NoError(b.t, err)
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return reply{code: resp.StatusCode, header: resp.Header, body: string(body)}
}

func (b *browser) get(app *sessionApp, path string) reply {
	return b.do(http.MethodGet, app.srv.URL+path)
}

func (b *browser) post(app *sessionApp, path string) reply {
	return b.do(http.MethodPost, app.srv.URL+path)
}

func (b *browser) cookie(app *sessionApp) string {
	u, _ := url.Parse(app.srv.URL)
	u.Scheme = "https"
	for _, c := range b.jar.Cookies(u) {
		if c.Name == DefaultSessionCookie {
			return c.Value
		}
	}
	return ""
}

func (b *browser) setCookie(app *sessionApp, value string) {
	u, _ := url.Parse(app.srv.URL)
	u.Scheme = "https"
	b.jar.SetCookies(u, []*http.Cookie{{Name: DefaultSessionCookie, Value: value, Path: "/"}})
}

func valueOf(t *testing.T, r reply) (bool, any) {
	t.Helper()
	require.Equal(t, http.StatusOK, r.code, r.body)
	var out struct {
		Found bool `json:"found"`
		Value any  `json:"value"`
	}
	require.NoError(t, json.Unmarshal([]byte(r.body), &out), r.body)
	return out.Found, out.Value
}

// countKeys counts the keys under the test's prefix on every master.
func countKeys(t *testing.T, r *testRedis, c rueidis.Client) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n := 0
	require.NoError(t, scanMasters(ctx, c, matchPattern(r.Keys.Prefix()), func(_ context.Context, _ rueidis.Client, keys []string) error {
		n += len(keys)
		return nil
	}))
	return n
}

func TestSessionBasicFlow(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newSessionApp(t, r, c, nil)
		b := newBrowser(t)

		rep := b.get(app, "/get?k=name")
		found, _ := valueOf(t, rep)
		require.False(t, found)
		require.Empty(t, rep.header.Values("Set-Cookie"), "no cookie until something is stored")
		require.Zero(t, countKeys(t, r, c), "no Redis key until something is stored")

		rep = b.post(app, "/set?k=name&v=alice")
		require.Equal(t, http.StatusOK, rep.code)
		setCookie := rep.header.Get("Set-Cookie")
		require.Contains(t, setCookie, "sessionId=")
		for _, attr := range []string{"HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age=86400"} {
			require.Contains(t, setCookie, attr)
		}
		require.Contains(t, rep.header.Values("Vary"), "Cookie")
		require.Equal(t, "no-store", rep.header.Get("Cache-Control"))
		require.Equal(t, 1, countKeys(t, r, c))

		found, v := valueOf(t, b.get(app, "/get?k=name"))
		require.True(t, found)
		require.Equal(t, "alice", v)

		require.Equal(t, http.StatusNoContent, b.post(app, "/delete?k=name").code)
		found, _ = valueOf(t, b.get(app, "/get?k=name"))
		require.False(t, found)
	})
}

func TestSessionTypedGettersAndCodec(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		e := echo.New()
		e.Use(store.Middleware())
		e.POST("/", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.NoError(t, s.Set("n", 42))
			require.NoError(t, s.Set("f", 2.5))
			require.NoError(t, s.Set("b", true))
			require.NoError(t, s.Set("s", "x"))
			require.NoError(t, s.Set("obj", map[string]int{"a": 1}))
			return c.NoContent(http.StatusNoContent)
		})
		e.GET("/", func(c echo.Context) error {
			s, _ := GetSession(c)
			n, ok := s.GetInt("n")
			require.True(t, ok)
			require.Equal(t, 42, n)
			n64, _ := s.GetInt64("n")
			require.Equal(t, int64(42), n64)
			f, _ := s.GetFloat64("f")
			require.Equal(t, 2.5, f)
			bv, _ := s.GetBool("b")
			require.True(t, bv)
			str, _ := s.GetString("s")
			require.Equal(t, "x", str)
			_, ok = s.GetInt("s")
			require.False(t, ok, "a string is not an int")
			_, ok = s.GetString("missing")
			require.False(t, ok)
			obj, ok := SessionValue[map[string]int](s, "obj")
			require.True(t, ok)
			require.Equal(t, map[string]int{"a": 1}, obj)
			require.Equal(t, []string{"b", "f", "n", "obj", "s"}, s.Keys())
			return c.NoContent(http.StatusOK)
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		app := &sessionApp{store: store, srv: srv}
		b := newBrowser(t)
		require.Equal(t, http.StatusNoContent, b.post(app, "/").code)
		require.Equal(t, http.StatusOK, b.get(app, "/").code)
	})
}

func TestGetSessionWithoutMiddleware(t *testing.T) {
	e := echo.New()
	c := e.NewContext(httptest.NewRequest(http.MethodGet, "/", nil), httptest.NewRecorder())
	s, err := GetSession(c)
	require.Nil(t, s)
	require.ErrorIs(t, err, ErrNoSessionMiddleware)
}

func TestSessionConfigValidation(t *testing.T) {
	c := standaloneClient(t)
	tests := []struct {
		name    string
		given   SessionConfig
		wantErr error
	}{
		{name: "no client", given: SessionConfig{Keys: []string{testKey}}, wantErr: ErrNilClient},
		{name: "no keys", given: SessionConfig{Client: c}, wantErr: ErrNoSessionKeys},
		{name: "weak key", given: SessionConfig{Client: c, Keys: []string{"short"}}, wantErr: ErrWeakSessionKey},
		{name: "weak old key", given: SessionConfig{Client: c, Keys: []string{testKey, "short"}}, wantErr: ErrWeakSessionKey},
		{name: "bad cookie name", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "a b"}, wantErr: ErrInvalidSessionConfig},
		{name: "touch share too big", given: SessionConfig{Client: c, Keys: []string{testKey}, TouchAfter: 1}, wantErr: ErrInvalidSessionConfig},
		{name: "tiny lifetime", given: SessionConfig{Client: c, Keys: []string{testKey}, Lifetime: time.Millisecond}, wantErr: ErrInvalidSessionConfig},
		{name: "brace in prefix", given: SessionConfig{Client: c, Keys: []string{testKey}, Options: Options{Prefix: "{x}"}}, wantErr: ErrInvalidPrefix},
		{name: "anonymous idle longer than idle", given: SessionConfig{Client: c, Keys: []string{testKey}, IdleTimeout: time.Hour, AnonymousIdleTimeout: 2 * time.Hour}, wantErr: ErrInvalidSessionConfig},
		{name: "tiny anonymous idle", given: SessionConfig{Client: c, Keys: []string{testKey}, AnonymousIdleTimeout: time.Millisecond}, wantErr: ErrInvalidSessionConfig},
		{name: "anonymous size over max", given: SessionConfig{Client: c, Keys: []string{testKey}, MaxSize: 1000, AnonymousMaxSize: 1001}, wantErr: ErrInvalidSessionConfig},
		{name: "negative anonymous size", given: SessionConfig{Client: c, Keys: []string{testKey}, AnonymousMaxSize: -1}, wantErr: ErrInvalidSessionConfig},
		{name: "__Host- over plain HTTP", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "__Host-sid", InsecureCookie: true}, wantErr: ErrInvalidSessionConfig},
		{name: "__Host- with a path", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "__Host-sid", CookiePath: "/app"}, wantErr: ErrInvalidSessionConfig},
		{name: "__Host- with a domain", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "__Host-sid", CookieDomain: "example.com"}, wantErr: ErrInvalidSessionConfig},
		{name: "__host- in lower case with a domain", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "__host-sid", CookieDomain: "example.com"}, wantErr: ErrInvalidSessionConfig},
		{name: "__Secure- over plain HTTP", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "__Secure-sid", InsecureCookie: true}, wantErr: ErrInvalidSessionConfig},
		{name: "__Host- with the defaults", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "__Host-sid"}},
		{name: "__Host- with path /", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "__Host-sid", CookiePath: "/"}},
		{name: "__Secure- with a path and a domain", given: SessionConfig{Client: c, Keys: []string{testKey}, CookieName: "__Secure-sid", CookiePath: "/app", CookieDomain: "example.com"}},
		{name: "defaults", given: SessionConfig{Client: c, Keys: []string{testKey}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.given.ToMiddleware()
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				require.Panics(t, func() { SessionWithConfig(tt.given) })
				return
			}
			require.NoError(t, err)
			require.NotPanics(t, func() { Session(c, testKey) })
		})
	}
}

// TestSessionBadCookies: a missing, malformed, tampered, foreign or unknown
// cookie gives a fresh empty session and a cleared cookie: never a 500.
func TestSessionBadCookies(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newSessionApp(t, r, c, nil)
		owner := newBrowser(t)
		require.Equal(t, http.StatusOK, owner.post(app, "/set?k=secret&v=mine").code)
		good := owner.cookie(app)
		parts := strings.Split(good, ".")
		require.Len(t, parts, 4)
		foreign, err := NewSessionStore(SessionConfig{Client: c, Keys: []string{strings.Repeat("z", 32)}})
		require.NoError(t, err)
		tok := token{tag: parts[0], secret: parts[1]}

		tests := []struct {
			name  string
			given string
		}{
			{name: "garbage", given: "not-a-session"},
			{name: "empty", given: ""},
			{name: "too long", given: strings.Repeat("a", 5000)},
			{name: "tampered mac", given: parts[0] + "." + parts[1] + "." + parts[2] + "." + strings.Repeat("A", 22)},
			{name: "tampered secret", given: parts[0] + "." + strings.Repeat("B", 43) + "." + parts[2] + "." + parts[3]},
			{name: "tampered version", given: parts[0] + "." + parts[1] + ".99." + parts[3]},
			{name: "signed by a key not in the ring", given: foreign.encodeCookie(DefaultSessionCookie, tok, 1)},
			{name: "unknown session", given: app.store.encodeCookie(DefaultSessionCookie, newToken(""), 1)},
			{name: "negative version", given: func() string {
				p := tok.tag + "." + tok.secret + ".-1"
				return p + "." + app.store.mac(app.store.keys[0], DefaultSessionCookie, p)
			}()},
			{name: "braces and dots", given: "{a}.{b}.{c}.{d}"},
			{name: "no dots at all", given: strings.Repeat("x", 80)},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				b := newBrowser(t)
				b.setCookie(app, tt.given)
				rep := b.get(app, "/get?k=secret")
				found, _ := valueOf(t, rep)
				require.False(t, found, "a bad cookie never reaches another session")
				if tt.given != "" {
					require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=0", "the bad cookie is cleared")
				}
				rep = b.post(app, "/set?k=x&v=y")
				require.Equal(t, http.StatusOK, rep.code, "a bad cookie is replaced by a new session")
				found, v := valueOf(t, b.get(app, "/get?k=x"))
				require.True(t, found)
				require.Equal(t, "y", v)
			})
		}
		found, v := valueOf(t, owner.get(app, "/get?k=secret"))
		require.True(t, found, "the owner's session is untouched")
		require.Equal(t, "mine", v)
	})
}

// TestSessionKeyRotation: a cookie signed by an older key of the ring still
// works and is re-signed with the newest key.
func TestSessionKeyRotation(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		old := newSessionApp(t, r, c, func(cfg *SessionConfig) { cfg.Keys = []string{testOldKey} })
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(old, "/set?k=n&v=1").code)
		rotated := newSessionApp(t, r, c, func(cfg *SessionConfig) { cfg.Keys = []string{testKey, testOldKey} })
		b.setCookie(rotated, b.cookie(old))
		rep := b.get(rotated, "/get?k=n")
		found, v := valueOf(t, rep)
		require.True(t, found)
		require.Equal(t, "1", v)
		require.Contains(t, rep.header.Get("Set-Cookie"), "sessionId=", "re-signed with the newest key")
		_, _, wasRotated, ok := rotated.store.decodeCookie(DefaultSessionCookie, b.cookie(rotated))
		require.True(t, ok)
		require.False(t, wasRotated)
		// Once the old key is retired, the re-signed cookie still works.
		newOnly := newSessionApp(t, r, c, nil)
		b.setCookie(newOnly, b.cookie(rotated))
		found, _ = valueOf(t, b.get(newOnly, "/get?k=n"))
		require.True(t, found)
	})
}

// TestSessionConcurrentWritesKeepEveryValue: requests that change different
// values of one session at the same time all keep their change (the lost
// update every peer store suffers).
func TestSessionConcurrentWritesKeepEveryValue(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newSessionApp(t, r, r.Client(), nil)
		bApp := newSessionApp(t, r, r.Client(), nil)
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(a, "/set?k=seed&v=0").code)
		cookie := b.cookie(a)
		const n = 40
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				tab := newBrowser(t)
				app := a
				if i%2 == 1 {
					app = bApp
				}
				tab.setCookie(app, cookie)
				rep := tab.post(app, fmt.Sprintf("/set?k=k%d&v=%d", i, i))
				assert.Equal(t, http.StatusOK, rep.code, rep.body)
			})
		}
		wg.Wait()
		rep := b.get(a, "/all")
		var all map[string]any
		require.NoError(t, json.Unmarshal([]byte(rep.body), &all))
		for i := range n {
			require.Equal(t, strconv.Itoa(i), all[fmt.Sprintf("k%d", i)], "value k%d was lost", i)
		}
		require.Equal(t, "0", all["seed"])

		// Same value: the last writer wins.
		require.Equal(t, http.StatusOK, b.post(a, "/set?k=seed&v=first").code)
		require.Equal(t, http.StatusOK, b.post(bApp, "/set?k=seed&v=second").code)
		_, v := valueOf(t, b.get(a, "/get?k=seed"))
		require.Equal(t, "second", v)
	})
}

// TestSessionReadYourWritesAcrossInstances: two instances, each with its own
// default rueidis client (client-side caching on). Thousands of alternating
// write-then-read rounds see zero stale reads, and repeated unchanged reads
// are served from the local cache.
func TestSessionReadYourWritesAcrossInstances(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		apps := []*sessionApp{newSessionApp(t, r, r.Client(), nil), newSessionApp(t, r, r.Client(), nil)}
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(apps[0], "/set?k=n&v=start").code)
		for _, a := range apps {
			b.setCookie(a, b.cookie(apps[0]))
		}
		const rounds = 2000
		stale := 0
		for i := range rounds {
			w, rd := apps[i%2], apps[(i+1)%2]
			// Prime the reader's local cache with the current value first, so
			// the read after the write would be stale without the guard.
			_, _ = valueOf(t, b.get(rd, "/get?k=n"))
			rep := b.post(w, "/set?k=n&v="+strconv.Itoa(i))
			require.Equal(t, http.StatusOK, rep.code)
			syncCookie(b, apps, w)
			_, v := valueOf(t, b.get(rd, "/get?k=n"))
			if v != strconv.Itoa(i) {
				stale++
			}
			syncCookie(b, apps, rd)
		}
		require.Zero(t, stale, "stale reads in %d rounds", rounds)

		// Unchanged session: repeated reads are local cache hits.
		before := []SessionStats{apps[0].store.Stats(), apps[1].store.Stats()}
		const reads = 300
		for i := range reads {
			_, v := valueOf(t, b.get(apps[i%2], "/get?k=n"))
			require.Equal(t, strconv.Itoa(rounds-1), v)
		}
		var loads, hits uint64
		for i, a := range apps {
			st := a.store.Stats()
			loads += st.Loads - before[i].Loads
			hits += st.CacheHits - before[i].CacheHits
		}
		require.Equal(t, uint64(reads), loads)
		require.GreaterOrEqual(t, float64(hits)/float64(loads), 0.9, "cache hits %d of %d reads", hits, loads)
	})
}

// syncCookie copies the cookie the browser holds for app `from` to every
// app: they are the same site behind a load balancer.
func syncCookie(b *browser, apps []*sessionApp, from *sessionApp) {
	v := b.cookie(from)
	for _, a := range apps {
		if a != from {
			b.setCookie(a, v)
		}
	}
}

func TestSessionExpiry(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		clock := newFakeClock()
		c := r.Client()
		app := newSessionApp(t, r, c, func(cfg *SessionConfig) {
			cfg.Clock = clock
			cfg.IdleTimeout = time.Hour
			cfg.AnonymousIdleTimeout = time.Hour // these sessions are anonymous
			cfg.Lifetime = 3 * time.Hour
		})
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		saves := app.store.Stats().Saves

		// Read-only requests before a quarter of the idle timeout write nothing.
		clock.Advance(10 * time.Minute)
		found, _ := valueOf(t, b.get(app, "/get?k=n"))
		require.True(t, found)
		require.Equal(t, saves, app.store.Stats().Saves, "no write before TouchAfter")

		// After a quarter, a read extends the idle timeout (one write).
		clock.Advance(10 * time.Minute)
		rep := b.get(app, "/get?k=n")
		found, _ = valueOf(t, rep)
		require.True(t, found)
		require.Equal(t, saves+1, app.store.Stats().Saves, "the idle timeout slid")
		require.Empty(t, rep.header.Get("Set-Cookie"), "extending needs no new cookie")

		// Idle for longer than the timeout: gone, enforced by the server.
		clock.Advance(61 * time.Minute)
		rep = b.get(app, "/get?k=n")
		found, _ = valueOf(t, rep)
		require.False(t, found, "idle timeout")
		require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=0")

		// Absolute lifetime: gone even when used all along.
		b = newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		for range 5 {
			clock.Advance(35 * time.Minute)
			found, _ = valueOf(t, b.get(app, "/get?k=n"))
			require.True(t, found)
		}
		clock.Advance(10 * time.Minute) // 3 h 5 min since creation
		found, _ = valueOf(t, b.get(app, "/get?k=n"))
		require.False(t, found, "absolute lifetime")

		// A write-only request on an expired session starts a new one.
		b = newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=old").code)
		first := b.cookie(app)
		clock.Advance(2 * time.Hour)
		require.Equal(t, http.StatusOK, b.post(app, "/set-silent?k=other&v=new").code)
		require.NotEqual(t, first, b.cookie(app))
		found, _ = valueOf(t, b.get(app, "/get?k=n"))
		require.False(t, found, "the expired session's data is not carried over")
		found, v := valueOf(t, b.get(app, "/get?k=other"))
		require.True(t, found)
		require.Equal(t, "new", v)
	})
}

func TestSessionRedisTTLFollowsTimeouts(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newSessionApp(t, r, c, func(cfg *SessionConfig) { cfg.IdleTimeout, cfg.AnonymousIdleTimeout = time.Hour, time.Hour })
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		tok, _, _, ok := app.store.decodeCookie(DefaultSessionCookie, b.cookie(app))
		require.True(t, ok)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		ttl, err := c.Do(ctx, c.B().Pttl().Key(app.store.key(tok)).Build()).AsInt64()
		require.NoError(t, err)
		require.InDelta(t, time.Hour.Milliseconds(), ttl, 5000, "the key expires with the idle timeout")
	})
}

func TestSessionRememberMe(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.BrowserSessionCookie = true })
		b := newBrowser(t)
		rep := b.post(app, "/set?k=n&v=1")
		require.NotContains(t, rep.header.Get("Set-Cookie"), "Max-Age", "a browser-session cookie")
	})
}

func TestSessionRegenerate(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		clock := newFakeClock()
		app := newSessionApp(t, r, c, func(cfg *SessionConfig) { cfg.Clock, cfg.AnonymousIdleTimeout = clock, 2*time.Hour })
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=cart&v=3%20items").code)
		before := b.cookie(app)
		oldTok, _, _, _ := app.store.decodeCookie(DefaultSessionCookie, before)

		clock.Advance(time.Hour)
		rep := b.post(app, "/regenerate")
		require.Equal(t, http.StatusNoContent, rep.code)
		after := b.cookie(app)
		newTok, _, _, _ := app.store.decodeCookie(DefaultSessionCookie, after)
		require.NotEqual(t, oldTok.secret, newTok.secret, "a new ID")
		require.Equal(t, oldTok.tag, newTok.tag, "the slot tag survives, so the rename stays in one slot")
		require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=82800", "the absolute lifetime does not restart")

		found, v := valueOf(t, b.get(app, "/get?k=cart"))
		require.True(t, found, "the data moved with the session")
		require.Equal(t, "3 items", v)

		attacker := newBrowser(t)
		attacker.setCookie(app, before)
		found, _ = valueOf(t, attacker.get(app, "/get?k=cart"))
		require.False(t, found, "the old ID stopped working at once")
		require.Equal(t, 1, countKeys(t, r, c))
	})
}

func TestSessionDestroy(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newSessionApp(t, r, c, nil)
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		old := b.cookie(app)
		rep := b.post(app, "/destroy")
		require.Equal(t, http.StatusNoContent, rep.code)
		require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=0")
		require.Contains(t, rep.header.Values("Vary"), "Cookie")
		require.Equal(t, "no-store", rep.header.Get("Cache-Control"))
		require.Zero(t, countKeys(t, r, c))
		replay := newBrowser(t)
		replay.setCookie(app, old)
		found, _ := valueOf(t, replay.get(app, "/get?k=n"))
		require.False(t, found)
	})
}

func TestSessionFlash(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		b := newBrowser(t)
		require.Equal(t, http.StatusNoContent, b.post(app, "/flash?v=Saved!").code)
		found, v := valueOf(t, b.get(app, "/flash"))
		require.True(t, found)
		require.Equal(t, "Saved!", v)
		found, _ = valueOf(t, b.get(app, "/flash"))
		require.False(t, found, "read once")
	})
}

// TestSessionClear: Clear drops every value and flash, keeps the session
// and its binding, and values set after it in the same request are kept.
func TestSessionClear(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/login?user=alice").code)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=theme&v=dark").code)
		require.Equal(t, http.StatusNoContent, b.post(app, "/flash?v=hello").code)
		handle := b.get(app, "/whoami").body

		require.Equal(t, http.StatusNoContent, b.post(app, "/clear?then=fresh").code)
		all := b.get(app, "/all")
		require.Equal(t, http.StatusOK, all.code)
		require.JSONEq(t, `{"after":"fresh"}`, all.body)
		found, _ := valueOf(t, b.get(app, "/flash"))
		require.False(t, found, "flashes are cleared too")
		require.Equal(t, handle, b.get(app, "/whoami").body, "same session, same user")
	})
}

func TestSessionSavedWithoutResponseAndRefusedAfterIt(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		b := newBrowser(t)
		rep := b.post(app, "/set-silent?k=n&v=quiet")
		require.Equal(t, http.StatusOK, rep.code)
		require.Contains(t, rep.header.Get("Set-Cookie"), "sessionId=")
		found, v := valueOf(t, b.get(app, "/get?k=n"))
		require.True(t, found, "a handler that writes no response still gets its session saved")
		require.Equal(t, "quiet", v)

		rep = b.post(app, "/late")
		require.Equal(t, "done", rep.body)
		found, _ = valueOf(t, b.get(app, "/get?k=late"))
		require.False(t, found, "a change after the response started is refused, not silently lost")
	})
}

func TestSessionUserIndex(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newSessionApp(t, r, c, func(cfg *SessionConfig) { cfg.RecordUserAgent = true })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		const user = "user:{42}" // hostile: braces and a colon
		devices := make([]*browser, 3)
		for i := range devices {
			devices[i] = newBrowser(t)
			require.Equal(t, http.StatusOK, devices[i].post(app, "/login?user="+url.QueryEscape(user)).code)
		}
		other := newBrowser(t)
		require.Equal(t, http.StatusOK, other.post(app, "/login?user=7").code)

		list, err := app.store.ListUserSessions(ctx, user)
		require.NoError(t, err)
		require.Len(t, list, 3)
		var who struct{ User, Handle string }
		require.NoError(t, json.Unmarshal([]byte(devices[0].get(app, "/whoami").body), &who))
		require.Equal(t, user, who.User)
		handles := map[string]bool{}
		for _, s := range list {
			handles[s.Handle] = true
			require.NotContains(t, s.Handle, strings.Split(devices[0].cookie(app), ".")[1], "a handle never holds the token")
			require.False(t, s.Created.IsZero())
			require.Contains(t, s.UserAgent, "Go-http-client")
		}
		require.True(t, handles[who.Handle], "the current session is listed")

		// Regeneration keeps the index right: the new handle replaces the old.
		require.Equal(t, http.StatusNoContent, devices[1].post(app, "/regenerate").code)
		list, err = app.store.ListUserSessions(ctx, user)
		require.NoError(t, err)
		require.Len(t, list, 3)

		// Log out everywhere but here.
		n, err := app.store.DestroyUserSessions(ctx, user, who.Handle)
		require.NoError(t, err)
		require.Equal(t, 2, n)
		for i, d := range devices {
			require.NoError(t, json.Unmarshal([]byte(d.get(app, "/whoami").body), &who))
			if i == 0 {
				require.Equal(t, user, who.User, "the kept session still works")
			} else {
				require.Empty(t, who.User, "a destroyed session no longer works when the call returns")
			}
		}
		require.NoError(t, json.Unmarshal([]byte(other.get(app, "/whoami").body), &who))
		require.Equal(t, "7", who.User, "other users are untouched")
		list, err = app.store.ListUserSessions(ctx, user)
		require.NoError(t, err)
		require.Len(t, list, 1)

		// Logging in as someone else moves the session between indexes.
		require.Equal(t, http.StatusOK, devices[0].post(app, "/login?user=8").code)
		list, err = app.store.ListUserSessions(ctx, user)
		require.NoError(t, err)
		require.Empty(t, list)
		list, err = app.store.ListUserSessions(ctx, "8")
		require.NoError(t, err)
		require.Len(t, list, 1)
	})
}

func TestSessionSizeLimit(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		// Each value counts its key, its encoded size and SessionValueOverhead:
		// "a" = 60 x's costs 3 + 62 + 32 = 97 bytes.
		app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.MaxSize = 250 })
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=a&v="+strings.Repeat("x", 60)).code)

		// The handler read the session, so Set refuses at once.
		e := echo.New()
		e.Use(app.store.Middleware())
		e.POST("/", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.True(t, s.Has("a"))
			require.ErrorIs(t, s.Set("b", strings.Repeat("y", 120)), ErrSessionTooLarge) // 97 + 157 > 250
			require.ErrorIs(t, s.Set("c", strings.Repeat("y", 200)), ErrSessionTooLarge)
			require.NoError(t, s.Set("a", "small"), "replacing a value counts its old size out")
			return c.NoContent(http.StatusNoContent)
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		inline := &sessionApp{store: app.store, srv: srv}
		b.setCookie(inline, b.cookie(app))
		require.Equal(t, http.StatusNoContent, b.post(inline, "/").code)
		b.setCookie(app, b.cookie(inline))

		// A write-only handler gets the refusal from Set too, as a 413 it
		// can return as is.
		require.Equal(t, http.StatusOK, b.post(app, "/set-silent?k=big&v="+strings.Repeat("z", 80)).code)
		require.Equal(t, http.StatusOK, b.post(app, "/set-silent?k=big2&v="+strings.Repeat("z", 5)).code)
		rep := b.post(app, "/set-silent?k=huge&v="+strings.Repeat("z", 50))
		require.Equal(t, http.StatusRequestEntityTooLarge, rep.code)
		require.JSONEq(t, `{"message":"session too large"}`, rep.body)
		var all map[string]any
		require.NoError(t, json.Unmarshal([]byte(b.get(app, "/all").body), &all))
		require.Equal(t, map[string]any{"a": "small", "big": strings.Repeat("z", 80), "big2": "zzzzz"}, all, "unchanged")

		// Concurrent requests that each stay under the limit cannot push the
		// stored session over it: the save script checks atomically.
		tok, _, _, ok := app.store.decodeCookie(DefaultSessionCookie, b.cookie(app))
		require.True(t, ok)
		key := app.store.key(tok)
		_, err := app.store.runSave(context.Background(), key, key,
			app.store.saveArgs("update", time.Now(), 0, true, map[string][]byte{"v:more": []byte(strings.Repeat("m", 20))}, nil))
		require.ErrorIs(t, err, ErrSessionTooLarge)
		require.NoError(t, json.Unmarshal([]byte(b.get(app, "/all").body), &all))
		require.Len(t, all, 3, "the refused save wrote nothing")
	})
}

func TestSessionRedisDown(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		app := newSessionApp(t, f.testRedis, f.Client(), func(cfg *SessionConfig) { cfg.Timeout = 200 * time.Millisecond })
		degraded := newSessionApp(t, f.testRedis, f.Client(), func(cfg *SessionConfig) {
			cfg.Timeout = 200 * time.Millisecond
			cfg.Degrade = true
		})
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		b.setCookie(degraded, b.cookie(app))
		fresh := newBrowser(t)

		f.Stop(t)
		for _, path := range []string{"/get?k=n", "/all"} {
			rep := b.get(app, path)
			require.Equal(t, http.StatusServiceUnavailable, rep.code, path)
			require.JSONEq(t, `{"error":"session store unavailable"}`, rep.body)
			require.Empty(t, rep.header.Values("Set-Cookie"))
		}
		rep := b.post(app, "/set-silent?k=n&v=2")
		require.Equal(t, http.StatusServiceUnavailable, rep.code, "a write that cannot be saved is not a success")
		require.JSONEq(t, `{"error":"session store unavailable"}`, rep.body)
		rep = fresh.post(app, "/set?k=n&v=1")
		require.Equal(t, http.StatusServiceUnavailable, rep.code)
		require.NotContains(t, rep.body, "ok", "the handler's body is replaced")

		require.Equal(t, http.StatusOK, b.get(app, "/untouched").code, "a route that does not touch the session works")
		found, _ := valueOf(t, fresh.get(app, "/get?k=n"))
		require.False(t, found, "reading without a cookie needs no Redis")

		// Degraded mode: an empty session that is never saved.
		found, _ = valueOf(t, b.get(degraded, "/get?k=n"))
		require.False(t, found)
		rep = b.post(degraded, "/set?k=n&v=3")
		require.Equal(t, http.StatusOK, rep.code)
		require.Empty(t, rep.header.Values("Set-Cookie"))

		f.Start(t)
		require.Eventually(t, func() bool { return fresh.post(app, "/set?k=n&v=after").code == http.StatusOK },
			20*time.Second, 50*time.Millisecond, "sessions work again once Redis is back")
	})
}

// TestSessionSaveFailureReplacesResponse: the handler wrote 200 "ok", but
// Redis hung during the save: the client gets 503, never the handler's 200.
func TestSessionSaveFailureReplacesResponse(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		app := newSessionApp(t, f.testRedis, f.Client(), func(cfg *SessionConfig) { cfg.Timeout = 200 * time.Millisecond })
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		f.Pause(t)
		start := time.Now()
		rep := b.post(app, "/set?k=n&v=2") // writes {"ok":"yes"} before the save
		require.Equal(t, http.StatusServiceUnavailable, rep.code)
		require.JSONEq(t, `{"error":"session store unavailable"}`, rep.body)
		require.Empty(t, rep.header.Values("Set-Cookie"))
		require.Less(t, time.Since(start), 3*time.Second, "bounded by the deadline")
		f.Resume(t)
		require.Eventually(t, func() bool {
			rep := b.get(app, "/get?k=n")
			return rep.code == http.StatusOK
		}, 10*time.Second, 20*time.Millisecond)
	})
}

// TestSessionBreakerOpen: once the breaker opens, session requests get 503
// at once, without waiting for Redis.
func TestSessionBreakerOpen(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		br := NewBreaker(BreakerConfig{Failures: 1, Cooldown: time.Hour, Logger: discardLogger()})
		app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.Breaker = br })
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		for _, scope := range []string{"redis", "cluster"} {
			br.record(br.node(scope), unhealthy)
		}
		tok, _, _, _ := app.store.decodeCookie(DefaultSessionCookie, b.cookie(app))
		br.record(br.node(waitSlotMap(t, app.store.b, app.store.key(tok))), unhealthy)
		rep := b.get(app, "/get?k=n")
		require.Equal(t, http.StatusServiceUnavailable, rep.code)
		require.JSONEq(t, `{"error":"session store unavailable"}`, rep.body)
	})
}

// TestSessionNoHalfWrites: requests that set two values at once, while the
// server kills every connection over and over, leave each session with both
// values from the same request or neither: never a half-written save.
func TestSessionNoHalfWrites(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		// A breaker that never opens: the kills would open the shared one,
		// and a cool-down that outlasts the writers would let no save
		// through, which proves nothing about half-writes.
		br := NewBreaker(BreakerConfig{Failures: 1 << 30, Logger: discardLogger()})
		store, err := NewSessionStore(SessionConfig{Client: f.Client(), Keys: []string{testKey}, Options: Options{Prefix: f.Keys.Prefix(), Breaker: br, Logger: discardLogger()}})
		require.NoError(t, err)
		e := echo.New()
		e.Use(store.Middleware())
		e.POST("/pair", func(c echo.Context) error {
			s, _ := GetSession(c)
			v := c.QueryParam("v")
			require.NoError(t, s.Set("a", v))
			require.NoError(t, s.Set("b", v))
			return c.NoContent(http.StatusNoContent)
		})
		e.GET("/pair", func(c echo.Context) error {
			s, _ := GetSession(c)
			a, _ := s.GetString("a")
			b, _ := s.GetString("b")
			return c.JSON(http.StatusOK, []string{a, b})
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		app := &sessionApp{store: store, srv: srv}

		stop := make(chan struct{})
		killed := make(chan struct{})
		go func() {
			defer close(killed)
			for {
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
					f.KillConnections(t)
				}
			}
		}()
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Go(func() {
				b := newBrowser(t)
				for i := range 50 {
					b.post(app, fmt.Sprintf("/pair?v=%d-%d", w, i))
				}
			})
		}
		wg.Wait()
		close(stop)
		<-killed
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c := f.Client()
		sessions := 0
		require.NoError(t, scanMasters(ctx, c, matchPattern(f.Keys.Prefix()), func(ctx context.Context, _ rueidis.Client, keys []string) error {
			sessions += len(keys)
			for _, k := range keys {
				m, err := c.Do(ctx, c.B().Hgetall().Key(k).Build()).AsStrMap()
				require.NoError(t, err)
				require.Equal(t, m["v:a"], m["v:b"], "half-written session %s: %v", k, m)
				for _, meta := range []string{fVersion, fCreated, fAbsolute, fSeen, fSize} {
					require.NotEmpty(t, m[meta], "session %s lacks %s", k, meta)
				}
			}
			return nil
		}))
		require.NotZero(t, sessions, "some saves went through between the kills")
	})
}

// BenchmarkSessionRead measures the middleware's own cost on a read of a
// live, unchanged session (served by client-side caching), against the same
// handler without sessions. Load figures come from the bench/ harness.
func BenchmarkSessionRead(b *testing.B) {
	r := newTestRedis(b, standaloneRedis.name, standaloneRedis.addrs)
	store, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix()}})
	require.NoError(b, err)
	e := echo.New()
	handler := func(c echo.Context) error { return c.JSON(http.StatusOK, map[string]bool{"ok": true}) }
	e.GET("/plain", handler)
	g := e.Group("/s", store.Middleware())
	g.POST("/login", func(c echo.Context) error {
		s, _ := GetSession(c)
		return s.Set("user", "alice")
	})
	g.GET("/read", func(c echo.Context) error {
		s, _ := GetSession(c)
		if u, _ := s.GetString("user"); u != "alice" {
			return c.NoContent(http.StatusUnauthorized)
		}
		return handler(c)
	})
	rec := httptest.NewRecorder()
	e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/s/login", nil))
	cookie := rec.Result().Cookies()[0]
	for _, tc := range []struct{ name, path string }{{"baseline", "/plain"}, {"session", "/s/read"}} {
		b.Run(tc.name, func(b *testing.B) {
			req := httptest.NewRequest(http.MethodGet, tc.path, nil)
			req.AddCookie(cookie)
			b.ReportAllocs()
			for b.Loop() {
				rec := httptest.NewRecorder()
				e.ServeHTTP(rec, req)
				if rec.Code != http.StatusOK {
					b.Fatal(rec.Code)
				}
			}
		})
	}
}

// FuzzJSONCodecMatchesEncodingJSON: the codec's fast paths decode exactly as
// encoding/json does.
func FuzzJSONCodecMatchesEncodingJSON(f *testing.F) {
	for _, s := range []string{`"x"`, `"a\"b"`, `"é"`, `""`, `"\u0041"`, `42`, `-0`, `007`, `+1`, `1e3`, `true`, `false`, `null`, `"ctl` + "\x01" + `"`, `9223372036854775808`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		check := func(fast, std any) {
			errFast := JSONCodec{}.Unmarshal(data, fast)
			errStd := json.Unmarshal(data, std)
			require.Equal(t, errStd == nil, errFast == nil, "input %q: %v vs %v", data, errFast, errStd)
			if errStd == nil {
				require.Equal(t, std, fast, "input %q", data)
			}
		}
		var s1, s2 string
		check(&s1, &s2)
		var i1, i2 int
		check(&i1, &i2)
		var l1, l2 int64
		check(&l1, &l2)
		var b1, b2 bool
		check(&b1, &b2)
	})
}

func TestSessionPanickingHandlerSavesNothing(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		store, err := NewSessionStore(SessionConfig{Client: c, Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		e := echo.New()
		e.Use(middleware.RecoverWithConfig(middleware.RecoverConfig{DisablePrintStack: true}), store.Middleware())
		e.POST("/", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.NoError(t, s.Set("half", "made"))
			panic("boom")
		})
		rec := httptest.NewRecorder()
		e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
		require.Equal(t, http.StatusInternalServerError, rec.Code)
		require.Empty(t, rec.Header().Values("Set-Cookie"))
		require.Zero(t, countKeys(t, r, c))
	})
}

// TestSessionInvalidationWindow measures how long another instance keeps
// serving a session from its local cache after a third party destroyed it
// (log out everywhere). The README reports the figures; the test only
// requires that the change arrives.
func TestSessionInvalidationWindow(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newSessionApp(t, r, r.Client(), nil)
		other, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var windows []time.Duration
		for i := range 100 {
			b := newBrowser(t)
			user := fmt.Sprint("u", i)
			require.Equal(t, http.StatusOK, b.post(a, "/login?user="+user).code)
			tok, v, _, ok := a.store.decodeCookie(DefaultSessionCookie, b.cookie(a))
			require.True(t, ok)
			// Warm instance A's local cache.
			for range 3 {
				_, found, err := a.store.load(ctx, tok, v)
				require.NoError(t, err)
				require.True(t, found)
			}
			n, err := other.DestroyUserSessions(ctx, user)
			require.NoError(t, err)
			require.Equal(t, 1, n)
			start := time.Now()
			for {
				_, found, err := a.store.load(ctx, tok, v)
				require.NoError(t, err)
				if !found {
					break
				}
				require.Less(t, time.Since(start), 5*time.Second, "the invalidation never arrived")
			}
			windows = append(windows, time.Since(start))
		}
		slices.Sort(windows)
		t.Logf("%s: a destroyed session stays readable on another instance for p50 %v, p99 %v, max %v (100 trials)",
			r.Topology, windows[49], windows[98], windows[99])
	})
}

func TestSessionValueKeysAreValidated(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		e := echo.New()
		e.Use(store.Middleware())
		e.POST("/", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.ErrorIs(t, s.Set("", 1), ErrInvalidSessionKey)
			require.ErrorIs(t, s.Set(strings.Repeat("k", 257), 1), ErrInvalidSessionKey)
			require.ErrorIs(t, s.Delete(""), ErrInvalidSessionKey)
			require.ErrorIs(t, s.SetFlash("", 1), ErrInvalidSessionKey)
			require.Error(t, s.Set("fn", func() {}), "values the codec cannot encode are refused")
			for _, k := range []string{"{a}", "a:b", "_v", "v:x", "%7B", "ключ"} {
				require.NoError(t, s.Set(k, k), "hostile but valid key %q", k)
			}
			return c.NoContent(http.StatusNoContent)
		})
		e.GET("/", func(c echo.Context) error {
			s, _ := GetSession(c)
			for _, k := range []string{"{a}", "a:b", "_v", "v:x", "%7B", "ключ"} {
				v, ok := s.GetString(k)
				require.True(t, ok, k)
				require.Equal(t, k, v)
			}
			return c.NoContent(http.StatusNoContent)
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		app := &sessionApp{store: store, srv: srv}
		b := newBrowser(t)
		require.Equal(t, http.StatusNoContent, b.post(app, "/").code)
		require.Equal(t, http.StatusNoContent, b.get(app, "/").code, "metadata fields are not clobbered by look-alike keys")
	})
}

// ---- gorilla/sessions compatibility (echo-contrib/session) ----

// gorillaTestProfile is a custom type stored through gob, registered as a
// gorilla application would.
type gorillaTestProfile struct {
	Name  string
	Roles []string
}

func init() { gob.Register(gorillaTestProfile{}) }

// gorillaApp is one application instance written for echo-contrib/session,
// with the gorilla store as its only redisecho-specific line, plus routes
// under /s that use the Session middleware on the same store.
type gorillaApp struct {
	*sessionApp
	gstore *GorillaStore
	name   string // the session name the /g routes pass to session.Get
}

func newGorillaApp(t *testing.T, r *testRedis, client rueidis.Client, name string, mod func(*SessionConfig)) *gorillaApp {
	t.Helper()
	cfg := SessionConfig{Client: client, Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()}}
	if mod != nil {
		mod(&cfg)
	}
	store, err := NewSessionStore(cfg)
	require.NoError(t, err)
	gstore := NewGorillaStore(store)
	e := echo.New()
	e.HideBanner = true

	// The application as written for echo-contrib/session.
	g := e.Group("/g", session.Middleware(gstore))
	get := func(c echo.Context) (*sessions.Session, error) {
		if n := c.QueryParam("name"); n != "" {
			return session.Get(n, c)
		}
		return session.Get(name, c)
	}
	g.POST("/login", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		sess.Options = &sessions.Options{Path: "/", MaxAge: 86400 * 7, HttpOnly: true}
		sess.Values["userId"] = 42
		sess.Values["name"] = "alice"
		sess.Values["profile"] = gorillaTestProfile{Name: "Alice", Roles: []string{"admin"}}
		sess.Values["score"] = 2.5
		sess.Values["admin"] = true
		if err := sess.Save(c.Request(), c.Response()); err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]string{"message": "Login successful"})
	})
	g.GET("/me", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		userID, ok := sess.Values["userId"].(int)
		name, _ := sess.Values["name"].(string)
		profile, _ := sess.Values["profile"].(gorillaTestProfile)
		score, _ := sess.Values["score"].(float64)
		admin, _ := sess.Values["admin"].(bool)
		return c.JSON(http.StatusOK, map[string]any{
			"userId": userID, "isInt": ok, "name": name, "profile": profile, "score": score, "admin": admin,
			"isNew": sess.IsNew, "id": sess.ID, "count": len(sess.Values),
		})
	})
	g.GET("/all", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		out := map[string]string{}
		for k, v := range sess.Values {
			out[fmt.Sprint(k)] = fmt.Sprintf("%T:%v", v, v)
		}
		return c.JSON(http.StatusOK, out)
	})
	g.POST("/set", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		sess.Values[c.QueryParam("k")] = c.QueryParam("v")
		if err := sess.Save(c.Request(), c.Response()); err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]string{"ok": "yes"})
	})
	g.POST("/delete", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		delete(sess.Values, c.QueryParam("k"))
		if err := sess.Save(c.Request(), c.Response()); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	g.POST("/logout", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		sess.Options.MaxAge = -1
		if err := sess.Save(c.Request(), c.Response()); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	g.POST("/flash", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		sess.AddFlash(c.QueryParam("v"))
		if err := sess.Save(c.Request(), c.Response()); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	g.GET("/flash", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		flashes := sess.Flashes()
		if err := sess.Save(c.Request(), c.Response()); err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]any{"flashes": flashes})
	})
	g.POST("/bad-key", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		sess.Values[7] = "seven"
		sess.Values["fine"] = "ok"
		err = sess.Save(c.Request(), c.Response())
		require.ErrorIs(t, err, ErrGorillaValueKey)
		return c.NoContent(http.StatusBadRequest)
	})
	g.POST("/unregistered", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		sess.Values["m"] = map[string]int{"a": 1} // not gob-registered
		err = sess.Save(c.Request(), c.Response())
		require.Error(t, err)
		return c.NoContent(http.StatusBadRequest)
	})
	g.POST("/late", func(c echo.Context) error {
		sess, err := get(c)
		if err != nil {
			return err
		}
		require.NoError(t, c.String(http.StatusOK, "done"))
		sess.Values["late"] = "x"
		require.ErrorIs(t, sess.Save(c.Request(), c.Response()), ErrSessionCommitted)
		return nil
	})
	g.POST("/gone", func(c echo.Context) error { // the session ends between Get and Save
		sess, err := get(c)
		if err != nil {
			return err
		}
		n, err := store.DestroyUserSessions(c.Request().Context(), c.QueryParam("user"))
		require.NoError(t, err)
		require.Equal(t, 1, n)
		sess.Values["theme"] = "dark"
		if err := sess.Save(c.Request(), c.Response()); err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]any{"count": len(sess.Values), "isNew": sess.IsNew})
	})
	g.POST("/two", func(c echo.Context) error { // two named sessions in one request
		a, err := session.Get("first", c)
		if err != nil {
			return err
		}
		b, err := session.Get("second", c)
		if err != nil {
			return err
		}
		a.Values["which"], b.Values["which"] = "first", "second"
		if err := sessions.Save(c.Request(), c.Response()); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	g.GET("/two", func(c echo.Context) error {
		a, err := session.Get("first", c)
		if err != nil {
			return err
		}
		b, err := session.Get("second", c)
		if err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]any{"first": a.Values["which"], "second": b.Values["which"]})
	})

	// The same store through the Session middleware.
	s := e.Group("/s", store.Middleware())
	sess := func(c echo.Context) *SessionState {
		st, err := GetSession(c)
		require.NoError(t, err)
		return st
	}
	s.GET("/get", func(c echo.Context) error {
		var v any
		ok, err := sess(c).Get(c.QueryParam("k"), &v)
		if err != nil {
			return c.JSON(http.StatusOK, map[string]any{"found": ok, "decodeError": true})
		}
		return c.JSON(http.StatusOK, map[string]any{"found": ok, "value": v, "type": fmt.Sprintf("%T", v)})
	})
	s.GET("/int", func(c echo.Context) error {
		n, ok := sess(c).GetInt(c.QueryParam("k"))
		return c.JSON(http.StatusOK, map[string]any{"found": ok, "value": n, "handle": sess(c).Handle()})
	})
	s.POST("/set", func(c echo.Context) error {
		if err := sess(c).Set(c.QueryParam("k"), c.QueryParam("v")); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	s.POST("/bind", func(c echo.Context) error {
		if err := sess(c).SetUserID(c.QueryParam("user")); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})

	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)
	return &gorillaApp{sessionApp: &sessionApp{store: store, srv: srv}, gstore: gstore, name: name}
}

// cookieOf returns the browser's cookie named name for app, or "".
func cookieOf(b *browser, app *gorillaApp, name string) string {
	u, _ := url.Parse(app.srv.URL)
	u.Scheme = "https"
	for _, c := range b.jar.Cookies(u) {
		if c.Name == name {
			return c.Value
		}
	}
	return ""
}

func setCookieOf(b *browser, app *gorillaApp, name, value string) {
	u, _ := url.Parse(app.srv.URL)
	u.Scheme = "https"
	b.jar.SetCookies(u, []*http.Cookie{{Name: name, Value: value, Path: "/"}})
}

func jsonOf(t *testing.T, rep reply) map[string]any {
	t.Helper()
	require.Equal(t, http.StatusOK, rep.code, rep.body)
	var out map[string]any
	require.NoError(t, json.Unmarshal([]byte(rep.body), &out), rep.body)
	return out
}

// hashOf returns the Redis hash of the session in cookie value v of app's
// session named name.
func hashOf(t *testing.T, c rueidis.Client, app *gorillaApp, name, v string) map[string]string {
	t.Helper()
	tok, _, _, ok := app.gstore.st.decodeCookie(name, v)
	require.True(t, ok)
	m, err := c.Do(context.Background(), c.B().Hgetall().Key(app.store.key(tok)).Build()).AsStrMap()
	require.NoError(t, err)
	return m
}

// TestGorillaStoreRoundTripsTypes: values set through echo-contrib/session
// come back with their Go types in the next request, on another instance
// too, in the SessionStore's hash layout and cookie format.
func TestGorillaStoreRoundTripsTypes(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newGorillaApp(t, r, c, "session", nil)
		other := newGorillaApp(t, r, r.Client(), "session", nil)
		b := newBrowser(t)

		me := jsonOf(t, b.get(app.sessionApp, "/g/me"))
		require.Equal(t, true, me["isNew"])
		require.Zero(t, countKeys(t, r, c), "reading a new session stores nothing")

		rep := b.post(app.sessionApp, "/g/login")
		require.Equal(t, http.StatusOK, rep.code, rep.body)
		setCookie := rep.header.Get("Set-Cookie")
		require.True(t, strings.HasPrefix(setCookie, "session="), setCookie)
		for _, attr := range []string{"HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age=86400"} {
			require.Contains(t, setCookie, attr, "library defaults kept; Max-Age capped at the Lifetime")
		}
		require.Contains(t, rep.header.Values("Vary"), "Cookie")
		require.Equal(t, "no-store", rep.header.Get("Cache-Control"))
		require.Equal(t, 1, countKeys(t, r, c))

		want := map[string]any{
			"userId": float64(42), "isInt": true, "name": "alice", "score": 2.5, "admin": true,
			"profile": map[string]any{"Name": "Alice", "Roles": []any{"admin"}}, "isNew": false, "count": float64(5),
		}
		for _, a := range []*gorillaApp{app, other} {
			me = jsonOf(t, b.get(a.sessionApp, "/g/me"))
			for k, v := range want {
				require.Equal(t, v, me[k], k)
			}
			require.Empty(t, b.get(a.sessionApp, "/g/me").header.Values("Set-Cookie"), "a read sets no cookie")
		}

		// The SessionStore's layout: values under "v:", gob-encoded.
		cookie := cookieOf(b, app, "session")
		require.Len(t, strings.Split(cookie, "."), 4)
		h := hashOf(t, c, app, "session", cookie)
		var n any
		require.NoError(t, GobCodec{}.Unmarshal([]byte(h["v:userId"]), &n))
		require.Equal(t, 42, n)
		for _, f := range []string{fVersion, fCreated, fAbsolute, fSeen, fSize, fRemember} {
			require.Contains(t, h, f)
		}
		require.Equal(t, "1", h[fRemember])
		require.Equal(t, me["id"], func() string { tok, _, _, _ := app.gstore.st.decodeCookie("session", cookie); return tok.handle() }())

		// Changing one value rewrites that field only, and deleting works.
		require.Equal(t, http.StatusOK, b.post(other.sessionApp, "/g/set?k=name&v=bob").code)
		require.Equal(t, http.StatusNoContent, b.post(app.sessionApp, "/g/delete?k=admin").code)
		all := jsonOf(t, b.get(app.sessionApp, "/g/all"))
		require.Equal(t, map[string]any{
			"userId": "int:42", "name": "string:bob", "score": "float64:2.5",
			"profile": "redisecho.gorillaTestProfile:{Alice [admin]}",
		}, all)

		// Flashes are read once.
		require.Equal(t, http.StatusNoContent, b.post(app.sessionApp, "/g/flash?v=saved").code)
		require.Equal(t, map[string]any{"flashes": []any{"saved"}}, jsonOf(t, b.get(other.sessionApp, "/g/flash")))
		require.Equal(t, map[string]any{"flashes": nil}, jsonOf(t, b.get(app.sessionApp, "/g/flash")))

		// Refused values: nothing is written.
		before := hashOf(t, c, app, "session", cookieOf(b, app, "session"))
		require.Equal(t, http.StatusBadRequest, b.post(app.sessionApp, "/g/bad-key").code)
		require.Equal(t, http.StatusBadRequest, b.post(app.sessionApp, "/g/unregistered").code)
		require.Equal(t, before, hashOf(t, c, app, "session", cookieOf(b, app, "session")))

		// A save after the response started is refused.
		require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/late").code)
		require.NotContains(t, jsonOf(t, b.get(app.sessionApp, "/g/all")), "late")
	})
}

// TestGorillaStoreConcurrentChangesKeepEveryValue: requests changing
// different values of one session at the same time, on two instances, all
// keep their change, deletions included.
func TestGorillaStoreConcurrentChangesKeepEveryValue(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		apps := []*gorillaApp{
			newGorillaApp(t, r, r.Client(), "session", nil),
			newGorillaApp(t, r, r.Client(), "session", nil),
		}
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(apps[0].sessionApp, "/g/set?k=seed&v=0").code)
		require.Equal(t, http.StatusOK, b.post(apps[0].sessionApp, "/g/set?k=doomed&v=1").code)
		cookie := cookieOf(b, apps[0], "session")
		const n = 40
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				tab := newBrowser(t)
				app := apps[i%2]
				setCookieOf(tab, app, "session", cookie)
				rep := tab.post(app.sessionApp, fmt.Sprintf("/g/set?k=k%d&v=%d", i, i))
				assert.Equal(t, http.StatusOK, rep.code, rep.body)
			})
		}
		wg.Go(func() {
			tab := newBrowser(t)
			setCookieOf(tab, apps[1], "session", cookie)
			assert.Equal(t, http.StatusNoContent, tab.post(apps[1].sessionApp, "/g/delete?k=doomed").code)
		})
		wg.Wait()
		all := jsonOf(t, b.get(apps[0].sessionApp, "/g/all"))
		for i := range n {
			require.Equal(t, "string:"+strconv.Itoa(i), all[fmt.Sprintf("k%d", i)], "value k%d was lost", i)
		}
		require.Equal(t, "string:0", all["seed"])
		require.NotContains(t, all, "doomed")
		require.Len(t, all, n+1)
	})
}

// TestGorillaStoreMaxAgeDeletes: Options.MaxAge -1 deletes the session from
// Redis and clears the cookie; the old cookie no longer opens anything.
func TestGorillaStoreMaxAgeDeletes(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newGorillaApp(t, r, c, "session", nil)
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/login").code)
		old := cookieOf(b, app, "session")
		require.Equal(t, 1, countKeys(t, r, c))

		rep := b.post(app.sessionApp, "/g/logout")
		require.Equal(t, http.StatusNoContent, rep.code)
		require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=0")
		require.Contains(t, rep.header.Values("Vary"), "Cookie")
		require.Equal(t, "no-store", rep.header.Get("Cache-Control"))
		require.Zero(t, countKeys(t, r, c), "the session's key is gone")
		require.Empty(t, cookieOf(b, app, "session"), "the cookie is cleared")

		me := jsonOf(t, b.get(app.sessionApp, "/g/me"))
		require.Equal(t, true, me["isNew"])
		require.Equal(t, false, me["isInt"])

		replay := newBrowser(t)
		setCookieOf(replay, app, "session", old)
		me = jsonOf(t, replay.get(app.sessionApp, "/g/me"))
		require.Equal(t, true, me["isNew"], "the old cookie opens nothing")
		require.Equal(t, float64(0), me["count"])
	})
}

// TestGorillaStoreBadCookies: malformed, tampered, foreign or unknown
// cookies give a fresh, usable session through session.Get, never an error
// (which the handlers would turn into a 500).
func TestGorillaStoreBadCookies(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newGorillaApp(t, r, c, "session", nil)
		owner := newBrowser(t)
		require.Equal(t, http.StatusOK, owner.post(app.sessionApp, "/g/login").code)
		good := cookieOf(owner, app, "session")
		parts := strings.Split(good, ".")
		require.Len(t, parts, 4)
		tok := token{tag: parts[0], secret: parts[1]}
		foreign := NewGorillaStore(func() *SessionStore {
			st, err := NewSessionStore(SessionConfig{Client: c, Keys: []string{strings.Repeat("z", 32)}})
			require.NoError(t, err)
			return st
		}())

		tests := []struct{ name, given string }{
			{"garbage", "not-a-session"},
			{"too long", strings.Repeat("a", 5000)},
			{"tampered mac", parts[0] + "." + parts[1] + "." + parts[2] + "." + strings.Repeat("A", 22)},
			{"tampered secret", parts[0] + "." + strings.Repeat("B", 43) + "." + parts[2] + "." + parts[3]},
			{"tampered version", parts[0] + "." + parts[1] + ".99." + parts[3]},
			{"signed by a key not in the ring", foreign.st.encodeCookie("session", tok, 1)},
			{"signed for another cookie name", app.gstore.st.encodeCookie("other", tok, 1)},
			{"the middleware's cookie for this session", app.store.encodeCookie(app.store.cfg.CookieName, tok, 1)},
			{"unknown session", app.gstore.st.encodeCookie("session", newToken(""), 1)},
			{"braces and dots", "{a}.{b}.{c}.{d}"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				b := newBrowser(t)
				setCookieOf(b, app, "session", tt.given)
				me := jsonOf(t, b.get(app.sessionApp, "/g/me"))
				require.Equal(t, true, me["isNew"], "a bad cookie never reaches another session")
				require.Equal(t, false, me["isInt"])
				rep := b.post(app.sessionApp, "/g/set?k=x&v=y")
				require.Equal(t, http.StatusOK, rep.code, "a bad cookie is replaced by a new session")
				require.NotEqual(t, tt.given, cookieOf(b, app, "session"))
				require.Equal(t, map[string]any{"x": "string:y"}, jsonOf(t, b.get(app.sessionApp, "/g/all")))
			})
		}
		// A dead cookie is cleared by the next save even when it stores nothing.
		b := newBrowser(t)
		setCookieOf(b, app, "session", "not-a-session")
		rep := b.post(app.sessionApp, "/g/delete?k=nothing")
		require.Equal(t, http.StatusNoContent, rep.code)
		require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=0")

		me := jsonOf(t, owner.get(app.sessionApp, "/g/me"))
		require.Equal(t, float64(42), me["userId"], "the owner's session is untouched")
	})
}

// TestGorillaStoreNamesAndRotation: each session name is its own cookie and
// session; a cookie signed by an older key of the ring works and is re-signed
// by the next save.
func TestGorillaStoreNamesAndRotation(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		old := newGorillaApp(t, r, c, "session", func(cfg *SessionConfig) { cfg.Keys = []string{testOldKey} })
		b := newBrowser(t)
		require.Equal(t, http.StatusNoContent, b.post(old.sessionApp, "/g/two").code)
		first, second := cookieOf(b, old, "first"), cookieOf(b, old, "second")
		require.NotEmpty(t, first)
		require.NotEmpty(t, second)
		require.Equal(t, 2, countKeys(t, r, c), "two sessions")
		require.Equal(t, map[string]any{"first": "first", "second": "second"}, jsonOf(t, b.get(old.sessionApp, "/g/two")))

		rotated := newGorillaApp(t, r, c, "session", func(cfg *SessionConfig) { cfg.Keys = []string{testKey, testOldKey} })
		setCookieOf(b, rotated, "first", first)
		setCookieOf(b, rotated, "second", second)
		require.Equal(t, map[string]any{"first": "first", "second": "second"}, jsonOf(t, b.get(rotated.sessionApp, "/g/two")))
		// A save with no change re-signs the cookie with the newest key.
		rep := b.post(rotated.sessionApp, "/g/delete?name=first&k=none")
		require.Equal(t, http.StatusNoContent, rep.code)
		require.Contains(t, rep.header.Get("Set-Cookie"), "first=")
		resigned := cookieOf(b, rotated, "first")
		require.NotEqual(t, first, resigned)
		_, _, wasRotated, ok := rotated.gstore.st.decodeCookie("first", resigned)
		require.True(t, ok)
		require.False(t, wasRotated)

		newOnly := newGorillaApp(t, r, c, "session", nil)
		setCookieOf(b, newOnly, "first", resigned)
		setCookieOf(b, newOnly, "second", second)
		require.Equal(t, map[string]any{"first": "first", "second": nil}, jsonOf(t, b.get(newOnly.sessionApp, "/g/two")),
			"the re-signed cookie works; one signed by a retired key opens nothing")
	})
}

// TestGorillaStoreSessionEndedDuringRequest: a session destroyed between
// Get and Save ("log out everywhere" in another request) is not brought
// back: only this request's change goes to a new session.
func TestGorillaStoreSessionEndedDuringRequest(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newGorillaApp(t, r, c, DefaultSessionCookie, nil)
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/login").code)
		require.Equal(t, http.StatusNoContent, b.post(app.sessionApp, "/s/bind?user=u1").code)
		old := cookieOf(b, app, DefaultSessionCookie)
		out := jsonOf(t, b.post(app.sessionApp, "/g/gone?user=u1"))
		require.Equal(t, float64(1), out["count"], "the other values were dropped")
		require.Equal(t, false, out["isNew"])
		require.NotEqual(t, old, cookieOf(b, app, DefaultSessionCookie))
		require.Equal(t, map[string]any{"theme": "string:dark"}, jsonOf(t, b.get(app.sessionApp, "/g/all")))
		require.Equal(t, 1, countKeys(t, r, c), "only the new session (the user index went with the old one)")
	})
}

// TestGorillaStoreInterop: the gorilla store and the Session middleware share
// storage and cookie (for the configured cookie name). With GobCodec both
// read each other's values; with the default JSONCodec each reads only the
// values written with its codec, and neither destroys the other's.
func TestGorillaStoreInterop(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		t.Run("gob codec", func(t *testing.T) {
			app := newGorillaApp(t, r, r.Client(), DefaultSessionCookie, func(cfg *SessionConfig) { cfg.Codec = GobCodec{} })
			b := newBrowser(t)
			require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/login").code)
			got := jsonOf(t, b.get(app.sessionApp, "/s/int?k=userId"))
			require.Equal(t, true, got["found"])
			require.Equal(t, float64(42), got["value"])
			me := jsonOf(t, b.get(app.sessionApp, "/g/me"))
			require.Equal(t, me["id"], got["handle"], "the same session")

			require.Equal(t, http.StatusNoContent, b.post(app.sessionApp, "/s/set?k=name&v=bob").code)
			me = jsonOf(t, b.get(app.sessionApp, "/g/me"))
			require.Equal(t, "bob", me["name"])
			require.Equal(t, float64(42), me["userId"])
		})
		t.Run("json codec", func(t *testing.T) {
			app := newGorillaApp(t, r, r.Client(), DefaultSessionCookie, nil)
			b := newBrowser(t)
			require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/login").code)
			got := jsonOf(t, b.get(app.sessionApp, "/s/get?k=userId"))
			require.Equal(t, true, got["found"], "same session, same field")
			require.Equal(t, true, got["decodeError"], "but gob bytes are not JSON")

			require.Equal(t, http.StatusNoContent, b.post(app.sessionApp, "/s/set?k=theme&v=dark").code)
			all := jsonOf(t, b.get(app.sessionApp, "/g/all"))
			require.NotContains(t, all, "theme", "a JSON value is not shown to gorilla")
			require.Equal(t, "int:42", all["userId"])
			require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/set?k=name&v=bob").code)
			got = jsonOf(t, b.get(app.sessionApp, "/s/get?k=theme"))
			require.Equal(t, "dark", got["value"], "and a gorilla save leaves it alone")
		})
	})
}

// TestGorillaStoreRedisDown: with Redis stopped, session.Get and Save return
// an error that Echo answers with 503 and no internal text; with Degrade,
// handlers get an empty session that is never saved.
func TestGorillaStoreRedisDown(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		app := newGorillaApp(t, f.testRedis, f.Client(), "session", func(cfg *SessionConfig) { cfg.Timeout = 200 * time.Millisecond })
		degraded := newGorillaApp(t, f.testRedis, f.Client(), "session", func(cfg *SessionConfig) {
			cfg.Timeout = 200 * time.Millisecond
			cfg.Degrade = true
		})
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/login").code)
		setCookieOf(b, degraded, "session", cookieOf(b, app, "session"))
		fresh := newBrowser(t)

		f.Stop(t)
		for _, rep := range []reply{b.get(app.sessionApp, "/g/me"), b.post(app.sessionApp, "/g/set?k=n&v=2"), fresh.post(app.sessionApp, "/g/set?k=n&v=1")} {
			require.Equal(t, http.StatusServiceUnavailable, rep.code, rep.body)
			require.JSONEq(t, `{"message":"session store unavailable"}`, rep.body)
			require.Empty(t, rep.header.Values("Set-Cookie"))
		}
		me := jsonOf(t, fresh.get(app.sessionApp, "/g/me"))
		require.Equal(t, true, me["isNew"], "reading without a cookie needs no Redis")

		me = jsonOf(t, b.get(degraded.sessionApp, "/g/me"))
		require.Equal(t, true, me["isNew"])
		rep := b.post(degraded.sessionApp, "/g/set?k=n&v=3")
		require.Equal(t, http.StatusOK, rep.code)
		require.Empty(t, rep.header.Values("Set-Cookie"), "a degraded session is never saved")

		f.Start(t) // a restarted test server has lost its data
		require.Eventually(t, func() bool { return fresh.post(app.sessionApp, "/g/login").code == http.StatusOK },
			20*time.Second, 50*time.Millisecond, "sessions work again once Redis is back")
		me = jsonOf(t, fresh.get(app.sessionApp, "/g/me"))
		require.Equal(t, float64(42), me["userId"])
		me = jsonOf(t, b.get(app.sessionApp, "/g/me"))
		require.Equal(t, true, me["isNew"], "a session lost with the server's data is a new one, not an error")
	})
}

// TestGorillaStoreErrors: misuse is reported, not panicked on.
func TestGorillaStoreErrors(t *testing.T) {
	r := newTestRedis(t, "standalone", standaloneRedis.addrs)
	st, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix()}})
	require.NoError(t, err)
	gs := NewGorillaStore(st)
	req := httptest.NewRequest(http.MethodGet, "/", nil)
	s := sessions.NewSession(gs, "session")
	require.ErrorIs(t, gs.Save(req, httptest.NewRecorder(), s), ErrGorillaSessionUnknown)
	s, err = gs.New(req, "bad name")
	require.Error(t, err)
	require.NotNil(t, s, "never a nil session")
	s, err = gs.Get(req, "session")
	require.NoError(t, err)
	require.True(t, s.IsNew)
	other := httptest.NewRequest(http.MethodGet, "/", nil)
	require.ErrorIs(t, gs.Save(other, httptest.NewRecorder(), s), ErrGorillaSessionUnknown)
	var he *echo.HTTPError
	require.False(t, errors.As(ErrGorillaSessionUnknown, &he))
}

// FuzzDecodeCookieNeverPanics: whatever a client sends as a cookie, it is
// a session or a refusal, never a panic.
func FuzzDecodeCookieNeverPanics(f *testing.F) {
	st := &SessionStore{keys: [][]byte{[]byte(testKey)}, cfg: SessionConfig{CookieName: DefaultSessionCookie}}
	good := st.encodeCookie(DefaultSessionCookie, newToken(""), 3)
	for _, s := range []string{good, strings.Repeat("x", 80), "a.b.c.d", "....", good[:len(good)-1] + "!", strings.ReplaceAll(good, ".", "")} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		tok, version, _, ok := st.decodeCookie(DefaultSessionCookie, v)
		if ok {
			require.Equal(t, v, st.encodeCookie(DefaultSessionCookie, tok, version), "only a cookie we signed is accepted")
		}
	})
}

// TestSessionDestroyedWhileWriting: a write in flight while the session is
// destroyed ("log out everywhere") does not bring the login back.
func TestSessionDestroyedWhileWriting(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()}})
		require.NoError(t, err)
		other, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()}})
		require.NoError(t, err)
		inHandler, proceed := make(chan struct{}), make(chan struct{})
		e := echo.New()
		e.Use(store.Middleware())
		e.POST("/login", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.NoError(t, s.SetUserID("victim"))
			require.NoError(t, s.Set("role", "admin"))
			return c.NoContent(http.StatusNoContent)
		})
		e.POST("/slow-write", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.Equal(t, "victim", s.UserID())
			close(inHandler)
			<-proceed
			require.NoError(t, s.Set("theme", "dark"))
			return c.NoContent(http.StatusNoContent)
		})
		e.GET("/whoami", func(c echo.Context) error {
			s, _ := GetSession(c)
			role, _ := s.GetString("role")
			return c.JSON(http.StatusOK, map[string]string{"user": s.UserID(), "role": role})
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		app := &sessionApp{store: store, srv: srv}
		b := newBrowser(t)
		require.Equal(t, http.StatusNoContent, b.post(app, "/login").code)
		done := make(chan reply)
		go func() { done <- b.post(app, "/slow-write") }()
		<-inHandler
		n, err := other.DestroyUserSessions(context.Background(), "victim")
		require.NoError(t, err)
		require.Equal(t, 1, n)
		close(proceed)
		require.Equal(t, http.StatusNoContent, (<-done).code)
		var who map[string]string
		require.NoError(t, json.Unmarshal([]byte(b.get(app, "/whoami").body), &who))
		require.Equal(t, map[string]string{"user": "", "role": ""}, who, "the write started a fresh, anonymous session")
		list, err := store.ListUserSessions(context.Background(), "victim")
		require.NoError(t, err)
		require.Empty(t, list)
	})
}

// TestSessionDestroyedIsGoneAtOnceHere: on the instance that destroyed or
// regenerated a session, the old one never reads as live afterwards, even
// from a warm local cache.
func TestSessionDestroyedIsGoneAtOnceHere(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		ctx := context.Background()
		for i := range 300 {
			b := newBrowser(t)
			user := fmt.Sprint("gone", i)
			require.Equal(t, http.StatusOK, b.post(app, "/login?user="+user).code)
			tok, v, _, ok := app.store.decodeCookie(DefaultSessionCookie, b.cookie(app))
			require.True(t, ok)
			for range 2 { // warm the local cache
				_, found, err := app.store.load(ctx, tok, v)
				require.NoError(t, err)
				require.True(t, found)
			}
			if i%2 == 0 {
				n, err := app.store.DestroyUserSessions(ctx, user)
				require.NoError(t, err)
				require.Equal(t, 1, n)
			} else {
				require.Equal(t, http.StatusNoContent, b.post(app, "/regenerate").code)
			}
			_, found, err := app.store.load(ctx, tok, v)
			require.NoError(t, err)
			require.False(t, found, "round %d: the old session still read as live on this instance", i)
		}
	})
}

// TestSessionIndexKeepsInFlightLogins: an index entry written ahead of its
// session (a login in flight) survives a listing in between.
func TestSessionIndexKeepsInFlightLogins(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		ctx := context.Background()
		now := store.b.clock.Now()
		tok := newToken("")
		abs := now.Add(time.Hour)
		require.Nil(t, store.index(ctx, "u1", tok.handle(), abs, now))
		list, err := store.ListUserSessions(ctx, "u1")
		require.NoError(t, err)
		require.Empty(t, list, "not a session yet")
		_, err = store.runSave(ctx, store.key(tok), store.key(tok), store.saveArgs("new", now, abs.UnixMilli(), true,
			map[string][]byte{fUser: []byte("u1"), "v:x": []byte("1")}, nil))
		require.NoError(t, err)
		list, err = store.ListUserSessions(ctx, "u1")
		require.NoError(t, err)
		require.Len(t, list, 1, "the listing did not prune the in-flight entry")
	})
}

// TestDestroyUserSessionsKeepsInFlightBindings: a session indexed for a user
// but not bound yet (a login in flight) keeps its index entry, so the login
// that completes afterwards stays listed and can still be ended.
func TestDestroyUserSessionsKeepsInFlightBindings(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{testKey}, Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		ctx := context.Background()
		now := store.b.clock.Now()
		abs := now.Add(time.Hour)
		tok := newToken("")
		key := store.key(tok)
		// An anonymous session exists; a login has indexed it, not bound it yet.
		_, err = store.runSave(ctx, key, key, store.saveArgs("new", now, abs.UnixMilli(), true, map[string][]byte{"v:cart": []byte("1")}, nil))
		require.NoError(t, err)
		require.Nil(t, store.index(ctx, "u1", tok.handle(), abs, now))
		n, err := store.DestroyUserSessions(ctx, "u1")
		require.NoError(t, err)
		require.Zero(t, n, "not bound to u1: not ended")
		// The login completes.
		_, err = store.runSave(ctx, key, key, store.saveArgs("update", now, 0, true, map[string][]byte{fUser: []byte("u1")}, nil))
		require.NoError(t, err)
		requireOneIndexedSession(t, store, "u1", "the completed login is listed")
	})
}

func TestSessionGoneMarksStayBounded(t *testing.T) {
	st := &SessionStore{}
	for i := range 3000 {
		st.markGone(fmt.Sprint("k", i))
	}
	time.Sleep(goneWindow + 10*time.Millisecond)
	for i := range 1024 {
		st.markGone(fmt.Sprint("x", i))
	}
	n := 0
	st.gone.Range(func(_, _ any) bool { n++; return true })
	require.LessOrEqual(t, n, 1024, "expired marks were swept")
}

// userOf is the user /whoami answers, or "" with the status when it is not
// a 200.
func userOf(t *testing.T, rep reply) string {
	t.Helper()
	if rep.code != http.StatusOK {
		return ""
	}
	var who struct{ User string }
	require.NoError(t, json.Unmarshal([]byte(rep.body), &who), rep.body)
	return who.User
}

// TestSessionStalenessDuringPartition measures how long an instance cut off
// from Redis keeps serving, from its client-side cache, a session that was
// logged out everywhere meanwhile. Instance A reaches Redis through a proxy
// that the test freezes (packets dropped, no reset) and uses the options
// the library recommends: ConnWriteTimeout = DefaultConnWriteTimeout and
// rueidis's default Dialer.KeepAlive (1 s). rueidis drops a connection
// whose keep-alive PING gets no answer within ConnWriteTimeout, and its
// cache with it. Its ping timer ticks every KeepAlive and skips a tick that
// saw a reply since the last one, so the PING goes out 1 to 2 KeepAlives
// after the last reply: the bound is 2 × KeepAlive + ConnWriteTimeout (4 s),
// counted from the last reply before the partition. Standalone only: a cluster client learns
// the nodes' real addresses from CLUSTER SLOTS and would bypass the proxy.
func TestSessionStalenessDuringPartition(t *testing.T) {
	r := newTestRedis(t, standaloneRedis.name, standaloneRedis.addrs)
	proxy := newFreezeProxy(t, standaloneRedis.addrs[0])
	const keepAlive = time.Second // rueidis's default Dialer.KeepAlive
	clientA := r.Client(func(o *rueidis.ClientOption) {
		o.InitAddress = []string{proxy.Addr()}
		o.ForceSingleClient = true
		o.ConnWriteTimeout = DefaultConnWriteTimeout
	})
	appA := newSessionApp(t, r, clientA, nil)
	appB := newSessionApp(t, r, r.Client(), nil)
	b := newBrowser(t) // the jar's cookies are per host, so A and B share them
	require.Equal(t, http.StatusOK, b.post(appB, "/login?user=u1").code)
	require.Equal(t, "u1", userOf(t, b.get(appA, "/whoami")))
	hits := appA.store.Stats().CacheHits
	require.Equal(t, "u1", userOf(t, b.get(appA, "/whoami")))
	require.Equal(t, hits+1, appA.store.Stats().CacheHits, "A serves the session from its cache")

	proxy.Freeze()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := appB.store.DestroyUserSessions(ctx, "u1")
	require.NoError(t, err)
	require.Equal(t, 1, n)
	onB := newBrowser(t) // its own jar: B clears the dead cookie it is sent
	onB.setCookie(appB, b.cookie(appA))
	require.Empty(t, userOf(t, onB.get(appB, "/whoami")), "B sees the logout at once")

	loggedOut := time.Now()
	bound := 2*keepAlive + DefaultConnWriteTimeout + 3*time.Second // the margin is for a loaded CI machine
	var stale time.Duration
	for {
		rep := b.get(appA, "/whoami")
		if userOf(t, rep) != "u1" {
			require.Equal(t, http.StatusServiceUnavailable, rep.code, "cut off, A answers 503: %s", rep.body)
			require.JSONEq(t, `{"error":"session store unavailable"}`, rep.body)
			break
		}
		stale = time.Since(loggedOut)
		require.Less(t, stale, bound, "A still serves a logged-out session")
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("a cut-off instance served the logged-out session for %v (bound 2 × KeepAlive %v + ConnWriteTimeout %v)", stale.Round(time.Millisecond), keepAlive, DefaultConnWriteTimeout)

	// Once the partition heals, A reads the truth.
	proxy.Thaw()
	require.Eventually(t, func() bool {
		rep := b.get(appA, "/whoami")
		return rep.code == http.StatusOK && userOf(t, rep) == ""
	}, 10*time.Second, 50*time.Millisecond)
}

// TestSessionFullRedis: in a Redis that is out of memory (noeviction),
// sessions are read (HTTP 200 through the middleware, from the cache and on
// an instance that must go to Redis), every save answers the documented
// 503 with no internal text and writes nothing, logouts free memory and
// work, and once memory is freed everything works again.
func TestSessionFullRedis(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		app := newSessionApp(t, f.testRedis, f.Client(), nil)
		alice, phone, visitor := newBrowser(t), newBrowser(t), newBrowser(t)
		require.Equal(t, http.StatusOK, alice.post(app, "/login?user=alice").code)
		require.Equal(t, http.StatusOK, alice.post(app, "/set?k=theme&v=dark").code)
		require.Equal(t, http.StatusOK, phone.post(app, "/login?user=alice").code)
		require.Equal(t, http.StatusOK, visitor.post(app, "/set?k=cart&v=1").code)
		require.Equal(t, "alice", userOf(t, alice.get(app, "/whoami"))) // cached here

		plain := f.Client(func(o *rueidis.ClientOption) { o.DisableCache = true })
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		keyOf := func(b *browser) string {
			tok, _, _, ok := app.store.decodeCookie(DefaultSessionCookie, b.cookie(app))
			require.True(t, ok)
			return app.store.key(tok)
		}
		type snapshot struct {
			fields map[string]string
			pttl   int64
		}
		snap := func(key string) snapshot {
			m, err := plain.Do(ctx, plain.B().Hgetall().Key(key).Build()).AsStrMap()
			require.NoError(t, err)
			pttl, err := plain.Do(ctx, plain.B().Pttl().Key(key).Build()).AsInt64()
			require.NoError(t, err)
			return snapshot{m, pttl}
		}
		aliceKey, visitorKey := keyOf(alice), keyOf(visitor)
		before := map[string]snapshot{aliceKey: snap(aliceKey), visitorKey: snap(visitorKey)}
		keys := countKeys(t, f.testRedis, plain)

		f.Fill(t)

		// Reads work: from this instance's cache, and on a fresh instance
		// whose tracked read is refused and retried untracked.
		fresh := newSessionApp(t, f.testRedis, f.Client(), nil)
		for _, a := range []*sessionApp{app, fresh} {
			require.Equal(t, "alice", userOf(t, alice.get(a, "/whoami")))
			found, v := valueOf(t, alice.get(a, "/get?k=theme"))
			require.True(t, found)
			require.Equal(t, "dark", v)
			found, _ = valueOf(t, visitor.get(a, "/get?k=cart"))
			require.True(t, found)
		}

		// Every save answers 503 with the documented body, and writes nothing.
		saves := []struct {
			name string
			b    *browser
			path string
		}{
			{"change a value", alice, "/set?k=theme&v=light"},
			{"regenerate", visitor, "/regenerate"},
			{"log in on an anonymous session", visitor, "/login?user=bob"},
			{"unbind", alice, "/unbind"},
			{"create a session", newBrowser(t), "/set?k=cart&v=2"},
			{"log in afresh", newBrowser(t), "/login?user=carol"},
		}
		for _, tc := range saves {
			for _, a := range []*sessionApp{app, fresh} {
				rep := tc.b.post(a, tc.path)
				require.Equal(t, http.StatusServiceUnavailable, rep.code, "%s: %s", tc.name, rep.body)
				require.JSONEq(t, `{"error":"session store unavailable"}`, rep.body, tc.name)
				require.Empty(t, rep.header.Values("Set-Cookie"), tc.name)
			}
		}
		for key, was := range before {
			now := snap(key)
			require.Equal(t, was.fields, now.fields, "nothing half-written in %s", key)
			require.LessOrEqual(t, now.pttl, was.pttl, "no expiry extended in %s", key)
			require.Positive(t, now.pttl)
		}
		require.Equal(t, keys, countKeys(t, f.testRedis, plain), "no key created, no index written")

		// Logouts free memory: they work in a full Redis.
		phoneKey := keyOf(phone)
		require.Equal(t, http.StatusNoContent, phone.post(app, "/destroy").code)
		require.Empty(t, snap(phoneKey).fields, "destroyed")
		list, err := app.store.ListUserSessions(ctx, "alice")
		require.NoError(t, err)
		require.Len(t, list, 1, "the destroyed session left the index")
		require.Equal(t, http.StatusNoContent, visitor.post(fresh, "/destroy").code)
		require.Empty(t, snap(visitorKey).fields)

		// Once memory is freed, saves work again.
		f.Free(t)
		require.Equal(t, http.StatusOK, alice.post(app, "/set?k=theme&v=light").code)
		found, v := valueOf(t, alice.get(fresh, "/get?k=theme"))
		require.True(t, found)
		require.Equal(t, "light", v)
		require.Equal(t, http.StatusOK, phone.post(fresh, "/login?user=alice").code)
		n, err := app.store.DestroyUserSessions(ctx, "alice")
		require.NoError(t, err)
		require.Equal(t, 2, n)
	})
}

// TestSessionAnonymousDefaults: the anonymous limits default to 30 min and
// 4 KiB, capped at IdleTimeout and MaxSize.
func TestSessionAnonymousDefaults(t *testing.T) {
	c := standaloneClient(t)
	tests := []struct {
		name     string
		given    SessionConfig
		wantIdle time.Duration
		wantSize int
	}{
		{name: "defaults", wantIdle: 30 * time.Minute, wantSize: 4 << 10},
		{name: "short idle timeout", given: SessionConfig{IdleTimeout: 10 * time.Minute}, wantIdle: 10 * time.Minute, wantSize: 4 << 10},
		{name: "small max size", given: SessionConfig{MaxSize: 1000}, wantIdle: 30 * time.Minute, wantSize: 1000},
		{name: "set", given: SessionConfig{AnonymousIdleTimeout: time.Minute, AnonymousMaxSize: 100}, wantIdle: time.Minute, wantSize: 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.given
			cfg.Client, cfg.Keys = c, []string{testKey}
			st, err := NewSessionStore(cfg)
			require.NoError(t, err)
			require.Equal(t, tt.wantIdle, st.cfg.AnonymousIdleTimeout)
			require.Equal(t, tt.wantSize, st.cfg.AnonymousMaxSize)
		})
	}
}

// TestSessionAnonymousLimits: a session bound to no user lives under
// AnonymousIdleTimeout and AnonymousMaxSize, enforced by Redis and the save
// script; binding a user switches it to IdleTimeout and MaxSize, unbinding
// back; the gorilla store keeps the normal limits.
func TestSessionAnonymousLimits(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		clock := newFakeClock()
		app := newSessionApp(t, r, c, func(cfg *SessionConfig) {
			cfg.Clock = clock
			cfg.IdleTimeout, cfg.AnonymousIdleTimeout = time.Hour, 20*time.Minute
			cfg.MaxSize, cfg.AnonymousMaxSize = 2000, 500
		})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		keyOf := func(b *browser) string {
			tok, _, _, ok := app.store.decodeCookie(DefaultSessionCookie, b.cookie(app))
			require.True(t, ok)
			return app.store.key(tok)
		}
		pttl := func(b *browser) time.Duration {
			ms, err := c.Do(ctx, c.B().Pttl().Key(keyOf(b)).Build()).AsInt64()
			require.NoError(t, err)
			return time.Duration(ms) * time.Millisecond
		}
		big := func(n int) string { return strings.Repeat("x", n) }

		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=a&v="+big(300)).code)
		require.InDelta(t, float64(20*time.Minute), float64(pttl(b)), float64(5*time.Second), "an anonymous session expires with AnonymousIdleTimeout")

		// Growing beyond AnonymousMaxSize is refused, by Set and by the script.
		rep := b.post(app, "/set-silent?k=b&v="+big(300))
		require.Equal(t, http.StatusRequestEntityTooLarge, rep.code, rep.body)
		key := keyOf(b)
		_, err := app.store.runSave(ctx, key, key, app.store.saveArgs("update", clock.Now(), 0, true, map[string][]byte{"v:b": []byte(`"` + big(300) + `"`)}, nil))
		require.ErrorIs(t, err, ErrSessionTooLarge, "the script enforces it too")

		// Logged in: MaxSize and IdleTimeout.
		require.Equal(t, http.StatusOK, b.post(app, "/login?user=u1").code)
		require.InDelta(t, float64(time.Hour), float64(pttl(b)), float64(5*time.Second), "a bound session expires with IdleTimeout")
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=b&v="+big(1200)).code)
		require.Equal(t, http.StatusRequestEntityTooLarge, b.post(app, "/set-silent?k=c&v="+big(600)).code, "MaxSize still holds")
		clock.Advance(40 * time.Minute) // past the anonymous idle timeout, within the normal one
		found, _ := valueOf(t, b.get(app, "/get?k=b"))
		require.True(t, found, "a bound session outlives AnonymousIdleTimeout")

		// Unbound while holding more than AnonymousMaxSize: kept, may shrink,
		// may not grow, and expires with AnonymousIdleTimeout again.
		require.Equal(t, http.StatusNoContent, b.post(app, "/unbind").code)
		require.InDelta(t, float64(20*time.Minute), float64(pttl(b)), float64(5*time.Second))
		found, _ = valueOf(t, b.get(app, "/get?k=b"))
		require.True(t, found, "unbinding keeps the values")
		require.Equal(t, http.StatusRequestEntityTooLarge, b.post(app, "/set-silent?k=c&v=1").code, "it may not grow")
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=b&v=small").code, "it may shrink")

		// Idle longer than AnonymousIdleTimeout: gone (the app's clock says
		// so before Redis's TTL does).
		clock.Advance(21 * time.Minute)
		found, _ = valueOf(t, b.get(app, "/get?k=b"))
		require.False(t, found, "anonymous idle timeout")

		// A read after TouchAfter of the anonymous idle timeout extends it.
		b = newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=a&v=1").code)
		saves := app.store.Stats().Saves
		clock.Advance(6 * time.Minute) // over a quarter of 20 min, under a quarter of an hour
		found, _ = valueOf(t, b.get(app, "/get?k=a"))
		require.True(t, found)
		require.Equal(t, saves+1, app.store.Stats().Saves, "the anonymous idle timeout slid")

		// User IDs are bounded.
		e := echo.New()
		e.Use(app.store.Middleware())
		e.POST("/", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.ErrorIs(t, s.SetUserID(strings.Repeat("u", MaxUserIDLength+1)), ErrInvalidUserID)
			require.Empty(t, s.UserID(), "refused: nothing bound")
			require.NoError(t, s.SetUserID(strings.Repeat("u", MaxUserIDLength)))
			return c.NoContent(http.StatusNoContent)
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		require.Equal(t, http.StatusNoContent, newBrowser(t).do(http.MethodPost, srv.URL).code)
		for _, id := range []string{"", strings.Repeat("u", MaxUserIDLength+1)} {
			_, err := app.store.ListUserSessions(ctx, id)
			require.ErrorIs(t, err, ErrInvalidUserID)
			_, err = app.store.DestroyUserSessions(ctx, id)
			require.ErrorIs(t, err, ErrInvalidUserID)
		}
	})
}

// TestGorillaStoreKeepsNormalLimits: the gorilla API has no user binding,
// so its sessions live under IdleTimeout and MaxSize.
func TestGorillaStoreKeepsNormalLimits(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newGorillaApp(t, r, c, "session", func(cfg *SessionConfig) {
			cfg.IdleTimeout, cfg.AnonymousIdleTimeout = time.Hour, 20*time.Minute
			cfg.MaxSize, cfg.AnonymousMaxSize = 2000, 500
		})
		b := newBrowser(t)
		rep := b.do(http.MethodPost, app.srv.URL+"/g/set?k=big&v="+strings.Repeat("x", 1200))
		require.Equal(t, http.StatusOK, rep.code, "MaxSize, not AnonymousMaxSize: %s", rep.body)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		tok, _, _, ok := app.store.decodeCookie("session", cookieOf(b, app, "session"))
		require.True(t, ok)
		ms, err := c.Do(ctx, c.B().Pttl().Key(app.store.key(tok)).Build()).AsInt64()
		require.NoError(t, err)
		require.InDelta(t, time.Hour.Milliseconds(), ms, 5000, "IdleTimeout, not AnonymousIdleTimeout")
	})
}

// rawGet sends a GET with exactly the given Cookie header, no jar.
func rawGet(t *testing.T, url, cookieHeader string) reply {
	t.Helper()
	return rawDo(t, http.MethodGet, url, cookieHeader)
}

// rawDo sends a request with exactly the given Cookie header, no jar.
func rawDo(t *testing.T, method, url, cookieHeader string) reply {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	require.NoError(t, err)
	if cookieHeader != "" {
		req.Header.Set("Cookie", cookieHeader)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return reply{code: resp.StatusCode, header: resp.Header, body: string(body)}
}

// TestSessionCookieTossing: of several cookies of the session's name (one
// planted on a sub-path by a sibling site), the first that verifies and
// names a live session is used, and a valid cookie is never cleared because
// a bad one came first.
func TestSessionCookieTossing(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		user := newBrowser(t)
		require.Equal(t, http.StatusOK, user.post(app, "/login?user=u1").code)
		valid := user.cookie(app)
		tampered := valid[:len(valid)-1] + map[bool]string{true: "A", false: "B"}[valid[len(valid)-1] != 'A']
		foreignStore, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{strings.Repeat("f", 32)}})
		require.NoError(t, err)
		foreign := foreignStore.encodeCookie(DefaultSessionCookie, newToken(""), 0)
		dead := app.store.encodeCookie(DefaultSessionCookie, newToken(""), 0) // signed by us, no session
		junk := "not-a-session"

		tests := []struct {
			name      string
			given     []string // the cookies of the session's name, in the order sent
			wantUser  string
			wantClear bool
		}{
			{name: "valid", given: []string{valid}, wantUser: "u1"},
			{name: "tampered, valid", given: []string{tampered, valid}, wantUser: "u1"},
			{name: "valid, tampered", given: []string{valid, tampered}, wantUser: "u1"},
			{name: "foreign key, valid", given: []string{foreign, valid}, wantUser: "u1"},
			{name: "no session, valid", given: []string{dead, valid}, wantUser: "u1"},
			{name: "junk, no session, tampered, valid", given: []string{junk, dead, tampered, valid}, wantUser: "u1"},
			{name: "tampered", given: []string{tampered}, wantClear: true},
			{name: "no session", given: []string{dead}, wantClear: true},
			{name: "junk, no session", given: []string{junk, dead}, wantClear: true},
			{name: "more bad ones than are read: nothing cleared", given: append(slices.Repeat([]string{junk}, maxSessionCookies), valid)},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				parts := make([]string, len(tt.given))
				for i, v := range tt.given {
					parts[i] = DefaultSessionCookie + "=" + v
				}
				rep := rawGet(t, app.srv.URL+"/whoami", "other=1; "+strings.Join(parts, "; "))
				require.Equal(t, http.StatusOK, rep.code, rep.body)
				require.Equal(t, tt.wantUser, userOf(t, rep))
				if tt.wantClear {
					require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=0")
				} else {
					require.Empty(t, rep.header.Values("Set-Cookie"), "nothing cleared, nothing reissued")
				}
			})
		}

		// A real browser: a sibling site plants cookies of our name on a
		// sub-path; the browser sends them first there.
		u, _ := url.Parse(app.srv.URL)
		u.Scheme = "https"
		for _, planted := range []string{junk, tampered, dead} {
			sub := *u
			sub.Path = "/sub"
			user.jar.SetCookies(&sub, []*http.Cookie{{Name: DefaultSessionCookie, Value: planted, Path: "/sub"}})
			sub.Path = "/sub/whoami"
			sent := user.jar.Cookies(&sub)
			require.Len(t, sent, 2)
			require.Equal(t, planted, sent[0].Value, "the sub-path cookie goes first")
			for _, path := range []string{"/sub/whoami", "/whoami"} {
				rep := user.get(app, path)
				require.Equal(t, "u1", userOf(t, rep), "%s with %q planted", path, planted)
				require.Empty(t, rep.header.Values("Set-Cookie"))
			}
			require.Equal(t, valid, user.cookie(app), "the valid cookie is kept")
		}

		// Writes that do not read the session first go to the live one too:
		// a planted cookie naming no session neither takes the change nor
		// gets the valid cookie cleared.
		tossed := DefaultSessionCookie + "=" + dead + "; " + DefaultSessionCookie + "=" + valid
		rep := rawDo(t, http.MethodPost, app.srv.URL+"/delete?k=nothing", tossed)
		require.Equal(t, http.StatusNoContent, rep.code, rep.body)
		require.NotContains(t, rep.header.Get("Set-Cookie"), "Max-Age=0")
		require.Equal(t, "u1", userOf(t, rawGet(t, app.srv.URL+"/whoami", tossed)))
		require.Equal(t, http.StatusNoContent, rawDo(t, http.MethodPost, app.srv.URL+"/destroy", tossed).code)
		require.Empty(t, userOf(t, rawGet(t, app.srv.URL+"/whoami", DefaultSessionCookie+"="+valid)), "the live session was destroyed")

		// The gorilla store picks the same way.
		g := newGorillaApp(t, r, r.Client(), "session", nil)
		gb := newBrowser(t)
		require.Equal(t, http.StatusOK, gb.do(http.MethodPost, g.srv.URL+"/g/login").code)
		gValid := cookieOf(gb, g, "session")
		gDead := g.store.encodeCookie("session", newToken(""), 0)
		for _, header := range []string{
			"session=" + junk + "; session=" + gValid,
			"session=" + gDead + "; session=" + tampered + "; session=" + gValid,
		} {
			me := jsonOf(t, rawGet(t, g.srv.URL+"/g/me", header))
			require.Equal(t, float64(42), me["userId"], header)
			require.Equal(t, false, me["isNew"])
		}
	})
}

// TestSessionPersonalResponsesArePrivate: a response whose handler read a
// logged-in session gets "Cache-Control: private" (unless the handler set
// one) and "Vary: Cookie" (added to the others), on the wire, even when
// the handler writes its headers itself; AllowSharedCaching turns it off.
func TestSessionPersonalResponsesArePrivate(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		newApp := func(allowShared bool) *sessionApp {
			app := newSessionApp(t, r, c, func(cfg *SessionConfig) { cfg.AllowSharedCaching = allowShared })
			e := echo.New()
			e.Use(app.store.Middleware())
			read := func(c echo.Context) string {
				s, err := GetSession(c)
				require.NoError(t, err)
				return s.UserID()
			}
			e.GET("/page", func(c echo.Context) error { return c.String(http.StatusOK, "hello "+read(c)) })
			e.GET("/own-headers", func(c echo.Context) error {
				u := read(c)
				c.Response().Header().Set("Cache-Control", "max-age=60")
				c.Response().Header().Set("Vary", "Accept-Encoding")
				return c.String(http.StatusOK, "hello "+u)
			})
			e.GET("/vary-cookie", func(c echo.Context) error {
				c.Response().Header().Set("Vary", "Accept, cookie")
				return c.String(http.StatusOK, "hello "+read(c))
			})
			e.GET("/stream", func(c echo.Context) error {
				u := read(c)
				c.Response().WriteHeader(http.StatusOK) // commits: the headers go out now
				_, err := c.Response().Write([]byte("hello " + u))
				return err
			})
			e.GET("/static", func(c echo.Context) error { return c.String(http.StatusOK, "static") })
			srv := httptest.NewServer(e)
			t.Cleanup(srv.Close)
			return &sessionApp{store: app.store, srv: srv}
		}
		app := newApp(false)
		loginApp := newSessionApp(t, r, c, nil) // same prefix and keys: the same sessions
		user, visitor := newBrowser(t), newBrowser(t)
		require.Equal(t, http.StatusOK, user.post(loginApp, "/login?user=u1").code)
		require.Equal(t, http.StatusOK, visitor.post(loginApp, "/set?k=theme&v=dark").code)

		tests := []struct {
			name      string
			b         *browser
			path      string
			wantCache string
			wantVary  []string
		}{
			{name: "logged in", b: user, path: "/page", wantCache: "private", wantVary: []string{"Cookie"}},
			{name: "own Cache-Control kept, Vary added", b: user, path: "/own-headers", wantCache: "max-age=60", wantVary: []string{"Accept-Encoding", "Cookie"}},
			{name: "Vary already names the cookie", b: user, path: "/vary-cookie", wantCache: "private", wantVary: []string{"Accept, cookie"}},
			{name: "headers written by the handler", b: user, path: "/stream", wantCache: "private", wantVary: []string{"Cookie"}},
			{name: "session not read", b: user, path: "/static"},
			{name: "anonymous session", b: visitor, path: "/page"},
			{name: "no session", b: newBrowser(t), path: "/page"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				rep := tt.b.get(app, tt.path)
				require.Equal(t, http.StatusOK, rep.code, rep.body)
				require.Equal(t, tt.wantCache, rep.header.Get("Cache-Control"))
				require.Equal(t, tt.wantVary, rep.header.Values("Vary"))
			})
		}
		shared := newApp(true)
		rep := user.get(shared, "/page")
		require.Equal(t, "hello u1", rep.body)
		require.Empty(t, rep.header.Get("Cache-Control"), "AllowSharedCaching leaves the headers alone")
		require.Empty(t, rep.header.Values("Vary"))
	})
}

// TestDestroyUserSessionsReportsMissingIndex: when the user's index is gone
// (evicted, deleted), "log out everywhere" cannot find the other sessions;
// it says so when the caller's own session is bound to the user but absent
// from the index.
func TestDestroyUserSessionsReportsMissingIndex(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newSessionApp(t, r, c, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		devices := []*browser{newBrowser(t), newBrowser(t), newBrowser(t)}
		for _, d := range devices {
			require.Equal(t, http.StatusOK, d.post(app, "/login?user=u1").code)
		}
		var who struct{ User, Handle string }
		require.NoError(t, json.Unmarshal([]byte(devices[0].get(app, "/whoami").body), &who))
		here := who.Handle
		idx := app.store.userKey("u1")

		// The index is lost (an eviction, a careless DEL).
		require.NoError(t, c.Do(ctx, c.B().Del().Key(idx).Build()).Error())
		n, err := app.store.DestroyUserSessions(ctx, "u1", here)
		require.ErrorIs(t, err, ErrSessionIndexMissing, "the caller's session is bound to u1 but not indexed")
		require.Zero(t, n)
		for _, d := range devices {
			require.Equal(t, "u1", userOf(t, d.get(app, "/whoami")), "the other sessions live on, as reported")
		}

		// Rebuilt in part by a new login: that one ends, the error stays.
		late := newBrowser(t)
		require.Equal(t, http.StatusOK, late.post(app, "/login?user=u1").code)
		n, err = app.store.DestroyUserSessions(ctx, "u1", here)
		require.ErrorIs(t, err, ErrSessionIndexMissing)
		require.Equal(t, 1, n)
		require.Empty(t, userOf(t, late.get(app, "/whoami")))

		// Without a session to check against, a lost index cannot be told
		// from a user with no other session.
		n, err = app.store.DestroyUserSessions(ctx, "u1")
		require.NoError(t, err)
		require.Zero(t, n)

		// An intact index: no error.
		fresh := []*browser{newBrowser(t), newBrowser(t)}
		for _, d := range fresh {
			require.Equal(t, http.StatusOK, d.post(app, "/login?user=u2").code)
		}
		require.NoError(t, json.Unmarshal([]byte(fresh[0].get(app, "/whoami").body), &who))
		n, err = app.store.DestroyUserSessions(ctx, "u2", who.Handle)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		require.Equal(t, "u2", userOf(t, fresh[0].get(app, "/whoami")))
		require.Empty(t, userOf(t, fresh[1].get(app, "/whoami")))
	})
}

// TestSessionClearDropsConcurrentWrites: Clear drops the values the session
// holds when the save runs, not only those the request read: a value
// another request of the previous user saved meanwhile does not carry over
// to the user who logs in.
func TestSessionClearDropsConcurrentWrites(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		inHandler, proceed := make(chan struct{}), make(chan struct{})
		e := echo.New()
		e.Use(app.store.Middleware())
		e.POST("/switch-user", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.Equal(t, "alice", s.UserID())
			require.NoError(t, s.Clear())
			require.NoError(t, s.Regenerate())
			require.NoError(t, s.SetUserID("bob"))
			close(inHandler)
			<-proceed
			return c.NoContent(http.StatusNoContent)
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		switcher := &sessionApp{store: app.store, srv: srv}

		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/login?user=alice").code)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=theme&v=alice-dark").code)
		aliceCookie := b.cookie(app)

		done := make(chan reply)
		go func() { done <- b.post(switcher, "/switch-user") }()
		<-inHandler
		// Alice's other tab saves a private value while bob logs in.
		tab := newBrowser(t)
		tab.setCookie(app, aliceCookie)
		require.Equal(t, http.StatusOK, tab.post(app, "/set?k=secret&v=alice-only").code)
		close(proceed)
		require.Equal(t, http.StatusNoContent, (<-done).code)

		require.Equal(t, "bob", userOf(t, b.get(app, "/whoami")))
		all := b.get(app, "/all")
		require.Equal(t, http.StatusOK, all.code)
		require.JSONEq(t, `{}`, all.body, "none of alice's values carry over to bob")
	})
}

// TestSessionManyValues: a save that sets, deletes or clears thousands of
// values at once works (Lua's unpack takes a few thousand values at most,
// so the script writes them in chunks).
func TestSessionManyValues(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		// 10,000 values take about 400 KB with their keys and overhead.
		app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.MaxSize = 1 << 20 })
		e := echo.New()
		e.Use(app.store.Middleware())
		e.POST("/bulk", func(c echo.Context) error {
			s, _ := GetSession(c)
			from, _ := strconv.Atoi(c.QueryParam("from"))
			n, _ := strconv.Atoi(c.QueryParam("n"))
			for i := from; i < from+n; i++ {
				if err := s.Set("k"+strconv.Itoa(i), 1); err != nil {
					return err
				}
			}
			return c.NoContent(http.StatusNoContent)
		})
		e.POST("/delete-all", func(c echo.Context) error {
			s, _ := GetSession(c)
			for _, k := range s.Keys() {
				if err := s.Delete(k); err != nil {
					return err
				}
			}
			return c.NoContent(http.StatusNoContent)
		})
		e.GET("/count", func(c echo.Context) error {
			s, _ := GetSession(c)
			return c.String(http.StatusOK, strconv.Itoa(len(s.Keys())))
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		bulk := &sessionApp{store: app.store, srv: srv}

		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/login?user=u1").code)
		for _, from := range []int{0, 5000} {
			rep := b.post(bulk, fmt.Sprintf("/bulk?from=%d&n=5000", from))
			require.Equal(t, http.StatusNoContent, rep.code, rep.body)
		}
		require.Equal(t, "10000", b.get(bulk, "/count").body)
		require.Equal(t, http.StatusNoContent, b.post(app, "/clear").code)
		require.Equal(t, "0", b.get(bulk, "/count").body)

		require.Equal(t, http.StatusNoContent, b.post(bulk, "/bulk?from=0&n=5000").code)
		require.Equal(t, http.StatusNoContent, b.post(bulk, "/delete-all").code)
		require.Equal(t, "0", b.get(bulk, "/count").body)
		require.Equal(t, "u1", userOf(t, b.get(app, "/whoami")))
	})
}

// TestDestroyUserSessionsInFullRedisKeepsInFlightLogins: in a full Redis,
// "log out everywhere" cannot leave its marker on the key of a login in
// flight (indexed, not written yet), so it keeps that index entry: a login
// that lands once memory is freed stays listed, and can be ended.
func TestDestroyUserSessionsInFullRedisKeepsInFlightLogins(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		store, err := NewSessionStore(SessionConfig{Client: f.Client(), Keys: []string{testKey}, Options: Options{Prefix: f.Keys.Prefix(), Logger: discardLogger()}})
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		now := store.b.clock.Now()
		abs := now.Add(time.Hour)
		tok := newToken("")
		require.Nil(t, store.index(ctx, "u1", tok.handle(), abs, now)) // a login in flight

		f.Fill(t)
		n, err := store.DestroyUserSessions(ctx, "u1")
		require.NoError(t, err)
		require.Zero(t, n)

		f.Free(t) // the logout freed memory, say; the login lands
		_, err = store.runSave(ctx, store.key(tok), store.key(tok), store.saveArgs("new", now, abs.UnixMilli(), true,
			map[string][]byte{fUser: []byte("u1"), "v:x": []byte("1")}, nil))
		require.NoError(t, err)
		requireOneIndexedSession(t, store, "u1", "the login that landed is in the index")
	})
}

// TestSessionTinyValuesCountTowardsTheCap: each value counts its key and
// SessionValueOverhead, so an anonymous session of many one-byte values is
// refused near its cap, and its Redis memory stays near the cap too (it
// used to take 4,096 of them: 197 KB under a 4 KiB cap).
func TestSessionTinyValuesCountTowardsTheCap(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		app := newSessionApp(t, r, c, nil)
		e := echo.New()
		e.Use(app.store.Middleware())
		e.POST("/tiny", func(c echo.Context) error {
			s, _ := GetSession(c)
			n := 0
			for ; n < 4096; n++ {
				if err := s.Set(strconv.Itoa(n), 1); err != nil {
					require.ErrorIs(t, err, ErrSessionTooLarge)
					break
				}
			}
			return c.String(http.StatusOK, strconv.Itoa(n))
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		b := newBrowser(t)
		rep := b.post(&sessionApp{store: app.store, srv: srv}, "/tiny")
		require.Equal(t, http.StatusOK, rep.code)
		n, err := strconv.Atoi(rep.body)
		require.NoError(t, err)
		require.Less(t, n, DefaultAnonymousMaxSize/SessionValueOverhead, "each value costs at least its overhead")
		require.Greater(t, n, DefaultAnonymousMaxSize/(SessionValueOverhead+8))

		tok, _, _, ok := app.store.decodeCookie(DefaultSessionCookie, b.cookie(&sessionApp{store: app.store, srv: srv}))
		require.True(t, ok)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		key := app.store.key(tok)
		fields, err := c.Do(ctx, c.B().Hlen().Key(key).Build()).AsInt64()
		require.NoError(t, err)
		require.GreaterOrEqual(t, fields, int64(n), "the values that fit were saved")
		require.LessOrEqual(t, fields, int64(n+9), "with the metadata")
		used, err := c.Do(ctx, c.B().MemoryUsage().Key(key).Samples(0).Build()).AsInt64()
		require.NoError(t, err)
		require.Less(t, used, int64(2*DefaultAnonymousMaxSize), "Redis memory stays near the cap")
	})
}

// requireOneIndexedSession checks that user's index lists exactly one
// session, and that DestroyUserSessions ends it.
func requireOneIndexedSession(t *testing.T, store *SessionStore, user, why string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := store.ListUserSessions(ctx, user)
	require.NoError(t, err)
	require.Len(t, list, 1, why)
	n, err := store.DestroyUserSessions(ctx, user)
	require.NoError(t, err)
	require.Equal(t, 1, n, "and can be ended")
}

package redisecho

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho/internal/expresstest"
	"github.com/redisecho/redisecho/internal/redistest"
)

// The Express migration mode against the real packages: an Express app
// (internal/expressapp: express 5, express-session 1.19.0, connect-redis
// 9.0.0, node-redis 5) and Go apps on the same Redis, driven over HTTP
// with one cookie jar (cookies are not port-specific, so both apps on
// 127.0.0.1 see the same cookies).

const expressSecret = "your-secret-key" // the guide's: short, as Express allows

// expressSide starts the Express app on r with the guide's options under
// r's prefix, plus env.
func expressSide(t *testing.T, r *testRedis, env map[string]string) *expresstest.App {
	t.Helper()
	e := map[string]string{"SESSION_SECRET": expressSecret, "SESSION_PREFIX": r.Keys.Prefix() + "session:", "EXIT_ON_STDIN_CLOSE": "1"}
	if r.Topology == "cluster" {
		e["REDIS_CLUSTER"] = strings.Join(r.addrs, ",")
	} else {
		e["REDIS_URL"] = "redis://" + r.addrs[0]
	}
	for k, v := range env {
		e[k] = v
	}
	return expresstest.Start(t, e)
}

// guideExpressConfig is the guide's session options in Go.
func guideExpressConfig(r *testRedis, client rueidis.Client) ExpressSessionConfig {
	return ExpressSessionConfig{
		Client: client, Secrets: []string{expressSecret}, CookieName: "sessionId", KeyPrefix: r.Keys.Prefix() + "session:",
		Cookie: ExpressCookie{MaxAge: 24 * time.Hour, SameSite: http.SameSiteLaxMode},
	}
}

// goSide starts a Go app with the Express mode: the guide's routes, as the
// Express app has them, and test routes to set, dump and delete values.
func goSide(t *testing.T, cfg ExpressSessionConfig) string {
	t.Helper()
	mw, err := cfg.ToMiddleware()
	require.NoError(t, err)
	e := echo.New()
	e.Use(mw)
	users := map[string]int{"alice": 1, "bob": 2}
	e.POST("/login", func(c echo.Context) error {
		var body struct{ Username string }
		if err := c.Bind(&body); err != nil {
			return err
		}
		id, ok := users[body.Username]
		if !ok {
			return c.JSON(http.StatusBadRequest, map[string]string{"error": "Unknown user"})
		}
		s, _ := GetSession(c)
		for k, v := range map[string]any{"userId": id, "username": body.Username, "isAuthenticated": true} {
			if err := s.Set(k, v); err != nil {
				return err
			}
		}
		if err := s.Regenerate(); err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]string{"message": "Login successful"})
	})
	e.GET("/profile", func(c echo.Context) error {
		s, _ := GetSession(c)
		if ok, _ := s.GetBool("isAuthenticated"); !ok {
			return c.JSON(http.StatusUnauthorized, map[string]string{"error": "Not authenticated"})
		}
		id, _ := s.GetInt("userId")
		name, _ := s.GetString("username")
		return c.JSON(http.StatusOK, map[string]any{"userId": id, "username": name})
	})
	e.GET("/whoami", func(c echo.Context) error {
		s, _ := GetSession(c)
		return c.JSON(http.StatusOK, map[string]string{"userID": s.UserID()})
	})
	e.POST("/logout", func(c echo.Context) error {
		s, _ := GetSession(c)
		if err := s.Destroy(); err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]string{"message": "Logged out"})
	})
	e.POST("/session/set", func(c echo.Context) error {
		var body map[string]json.RawMessage
		if err := json.NewDecoder(c.Request().Body).Decode(&body); err != nil {
			return echo.NewHTTPError(http.StatusBadRequest, err.Error())
		}
		s, _ := GetSession(c)
		for k, v := range body {
			if err := s.Set(k, v); errors.Is(err, ErrInvalidSessionKey) {
				return echo.NewHTTPError(http.StatusBadRequest, "invalid key")
			} else if err != nil {
				return err
			}
		}
		return c.NoContent(http.StatusNoContent)
	})
	e.POST("/session/delete", func(c echo.Context) error {
		s, _ := GetSession(c)
		if err := s.Delete(c.QueryParam("key")); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	e.GET("/session/dump", func(c echo.Context) error {
		s, _ := GetSession(c)
		out := map[string]json.RawMessage{}
		for _, k := range s.Keys() {
			var v json.RawMessage
			if _, err := s.Get(k, &v); err != nil {
				return err
			}
			out[k] = v
		}
		return c.JSON(http.StatusOK, out)
	})
	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)
	return srv.URL
}

// jar is a browser: one cookie jar for both apps.
type jar struct {
	t *testing.T
	c *http.Client
}

func newJar(t *testing.T) *jar {
	j, err := cookiejar.New(nil)
	require.NoError(t, err)
	return &jar{t: t, c: &http.Client{Jar: j, Timeout: 10 * time.Second}}
}

// call sends body (JSON, or nil) and returns the status and the decoded
// JSON answer (nil when empty).
func (j *jar) call(method, u string, body any) (int, map[string]any) {
	j.t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		require.NoError(j.t, err)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, u, rd)
	require.NoError(j.t, err)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := j.c.Do(req)
	require.NoError(j.t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(j.t, err)
	var out map[string]any
	if len(bytes.TrimSpace(raw)) > 0 {
		d := json.NewDecoder(bytes.NewReader(raw))
		d.UseNumber()
		require.NoError(j.t, d.Decode(&out), "%s %s: %d %s", method, u, resp.StatusCode, raw)
	}
	return resp.StatusCode, out
}

// cookie returns the jar's session cookie value for u.
func (j *jar) cookie(u, name string) string {
	pu, _ := url.Parse(u)
	for _, c := range j.c.Jar.Cookies(pu) {
		if c.Name == name {
			return c.Value
		}
	}
	return ""
}

// blob reads a session's stored JSON straight from Redis.
func sessionBlob(t *testing.T, client rueidis.Client, key string) string {
	t.Helper()
	v, err := client.Do(context.Background(), client.B().Get().Key(key).Build()).ToString()
	require.NoError(t, err)
	return v
}

// TestExpressSharedLogin: a login on either side is a login on both, and
// a logout on either side ends the session on both.
func TestExpressSharedLogin(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ex := expressSide(t, r, nil)
		goURL := goSide(t, guideExpressConfig(r, r.Client()))
		for _, tc := range []struct{ name, loginAt, logoutAt string }{
			{"login on Express, logout on Go", ex.URL, goURL},
			{"login on Go, logout on Express", goURL, ex.URL},
		} {
			t.Run(tc.name, func(t *testing.T) {
				b := newJar(t)
				code, _ := b.call(http.MethodPost, tc.loginAt+"/login", map[string]string{"username": "alice"})
				require.Equal(t, http.StatusOK, code)
				for _, side := range []string{ex.URL, goURL} {
					code, p := b.call(http.MethodGet, side+"/profile", nil)
					require.Equal(t, http.StatusOK, code, side)
					require.Equal(t, json.Number("1"), p["userId"], "a JSON number on both sides")
					require.Equal(t, "alice", p["username"])
				}
				_, who := b.call(http.MethodGet, goURL+"/whoami", nil)
				require.Equal(t, "1", who["userID"], "UserID is the session's userId")
				code, _ = b.call(http.MethodPost, tc.logoutAt+"/logout", nil)
				require.Equal(t, http.StatusOK, code)
				for _, side := range []string{ex.URL, goURL} {
					code, _ := b.call(http.MethodGet, side+"/profile", nil)
					require.Equal(t, http.StatusUnauthorized, code, side)
				}
			})
		}
	})
}

// TestExpressValuesRoundTrip: values of every JSON type set on Express
// read the same in Go, and a Go write of one value leaves every other
// byte of the stored session as Express wrote it; a Go value reads in
// Express as the JSON type Go wrote.
func TestExpressValuesRoundTrip(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		ex := expressSide(t, r, nil)
		goURL := goSide(t, guideExpressConfig(r, client))
		b := newJar(t)
		values := map[string]any{
			"empty":    []any{},
			"list":     []any{1, "two", 3.5, nil, true, map[string]any{}},
			"nested":   map[string]any{"passport": map[string]any{"user": 42}, "deep": map[string]any{"a": []any{map[string]any{"b": "c"}}}},
			"big":      json.Number("9007199254740991"),
			"float":    json.Number("0.1"),
			"exp":      json.Number("1e+21"),
			"html":     "<b>&amp;</b>",
			"unicode":  "é😀\u2028\u2029",
			"quote":    `"\` + "\n\t",
			"nothing":  nil,
			"10":       "an integer-like key",
			"emptyStr": "",
		}
		code, _ := b.call(http.MethodPost, ex.URL+"/login", map[string]string{"username": "bob"})
		require.Equal(t, http.StatusOK, code)
		code, _ = b.call(http.MethodPost, ex.URL+"/session/set", values)
		require.Equal(t, http.StatusOK, code)
		_, exDump := b.call(http.MethodGet, ex.URL+"/session/dump", nil)
		key := r.Keys.Prefix() + "session:" + sessionIDOf(t, b.cookie(ex.URL, "sessionId"))
		before := sessionBlob(t, client, key)

		code, goDump := b.call(http.MethodGet, goURL+"/session/dump", nil)
		require.Equal(t, http.StatusOK, code)
		for k, v := range exDump {
			if k == "cookie" {
				continue
			}
			require.Equal(t, v, goDump[k], "Go reads %q as Express wrote it", k)
		}
		require.Equal(t, json.Number("2"), goDump["userId"])

		code, _ = b.call(http.MethodPost, goURL+"/session/set", map[string]any{"theme": "dark", "username": "bobby"})
		require.Equal(t, http.StatusNoContent, code)
		after := sessionBlob(t, client, key)
		require.Equal(t, strings.Replace(strings.TrimSuffix(before, "}"), `"username":"bob"`, `"username":"bobby"`, 1)+`,"theme":"dark"}`, after,
			"every byte Go did not change is kept, in place; the new key goes last")

		_, exDump2 := b.call(http.MethodGet, ex.URL+"/session/dump", nil)
		require.Equal(t, "dark", exDump2["theme"], "a string in Express")
		require.Equal(t, "bobby", exDump2["username"])
		for k, v := range exDump {
			if k != "username" && k != "cookie" {
				require.Equal(t, v, exDump2[k], "Express still reads %q unchanged", k)
			}
		}

		// The other way: every JSON type written by Go reads the same in
		// Express.
		goValues := map[string]any{}
		for k, v := range values {
			goValues["go_"+k] = v
		}
		code, _ = b.call(http.MethodPost, goURL+"/session/set", goValues)
		require.Equal(t, http.StatusNoContent, code)
		_, exDump4 := b.call(http.MethodGet, ex.URL+"/session/dump", nil)
		for k, v := range exDump {
			if k != "cookie" && k != "username" && k != "userId" && k != "isAuthenticated" {
				require.Equal(t, v, exDump4["go_"+k], "Express reads Go's %q as Express itself wrote it", k)
			}
		}

		code, _ = b.call(http.MethodPost, goURL+"/session/delete?key=list", nil)
		require.Equal(t, http.StatusNoContent, code)
		_, exDump3 := b.call(http.MethodGet, ex.URL+"/session/dump", nil)
		require.NotContains(t, exDump3, "list")
		require.Contains(t, exDump3, "nested")
	})
}

// goLogin logs alice in on the Go app at goURL in a new browser and
// returns it with the session's key under prefix.
func goLogin(t *testing.T, goURL, prefix string) (*jar, string) {
	t.Helper()
	b := newJar(t)
	code, _ := b.call(http.MethodPost, goURL+"/login", map[string]string{"username": "alice"})
	require.Equal(t, http.StatusOK, code)
	return b, prefix + sessionIDOf(t, b.cookie(goURL, "sessionId"))
}

// sessionIDOf returns the session ID of an express-session cookie value.
func sessionIDOf(t *testing.T, v string) string {
	t.Helper()
	dec, err := url.PathUnescape(v)
	require.NoError(t, err)
	s, ok := strings.CutPrefix(dec, "s:")
	require.True(t, ok, v)
	return s[:strings.LastIndexByte(s, '.')]
}

// TestExpressCookies: the cookie Go sets is the one Express sets (name,
// path, signature by the first secret, Expires, HttpOnly, SameSite), so a
// browser never holds two; tampered, unsigned and wrongly signed cookies
// are a new session on both sides, never a 500; secrets rotate with the
// same list on both sides.
func TestExpressCookies(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		cfg := guideExpressConfig(r, client)
		mw, err := cfg.ToMiddleware()
		require.NoError(t, err)
		e := echo.New()
		e.Use(mw)
		e.POST("/login", func(c echo.Context) error {
			s, _ := GetSession(c)
			return s.Set("userId", 1)
		})
		rec := httptest.NewRecorder()
		e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/login", nil))
		sc := rec.Header().Get("Set-Cookie")
		require.Regexp(t, `^sessionId=s%3A[A-Za-z0-9_-]{32}\.[A-Za-z0-9%]+; Path=/; Expires=[^;]+ GMT; HttpOnly; SameSite=Lax$`, sc)

		ex := expressSide(t, r, nil)
		goURL := goSide(t, cfg)
		b := newJar(t)
		code, _ := b.call(http.MethodPost, goURL+"/login", map[string]string{"username": "alice"})
		require.Equal(t, http.StatusOK, code)
		good := b.cookie(goURL, "sessionId")
		id := sessionIDOf(t, good)
		for name, value := range map[string]string{
			"tampered signature": strings.Replace(good, good[len(good)-4:], "AAAA", 1),
			"another ID":         strings.Replace(good, id, newExpressID(), 1),
			"unsigned":           id,
			"truncated":          good[:len(good)/2],
			"wrong secret":       "s%3A" + id + "." + strings.TrimPrefix((&expressMode{}).sign(id, []byte("another")), id+"."),
			"garbage":            "%zz%%s:..",
		} {
			for _, side := range []string{goURL, ex.URL} {
				req, _ := http.NewRequest(http.MethodGet, side+"/profile", nil)
				req.AddCookie(&http.Cookie{Name: "sessionId", Value: value})
				resp, err := http.DefaultClient.Do(req)
				require.NoError(t, err)
				_ = resp.Body.Close()
				require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "%s on %s", name, side)
			}
		}

		// Rotation: both sides put a new secret first; the old cookie
		// still works, and new cookies are signed with the new secret.
		rotated := cfg
		rotated.Secrets = []string{"a-new-secret", expressSecret}
		goNew := goSide(t, rotated)
		exNew := expressSide(t, r, map[string]string{"SESSION_SECRET": "a-new-secret," + expressSecret})
		for _, side := range []string{goNew, exNew.URL} {
			code, p := b.call(http.MethodGet, side+"/profile", nil)
			require.Equal(t, http.StatusOK, code, side)
			require.Equal(t, "alice", p["username"])
		}
		c2 := newJar(t)
		code, _ = c2.call(http.MethodPost, goNew+"/login", map[string]string{"username": "bob"})
		require.Equal(t, http.StatusOK, code)
		code, _ = c2.call(http.MethodGet, exNew.URL+"/profile", nil)
		require.Equal(t, http.StatusOK, code, "signed with the new secret, read by Express")
		code, _ = c2.call(http.MethodGet, ex.URL+"/profile", nil)
		require.Equal(t, http.StatusUnauthorized, code, "an app that lacks the new secret does not read it")
	})
}

// TestExpressConcurrentGoUpdates: Go requests on two instances (each its
// own client) that change different values of one session at once never
// lose each other's updates (compare-and-set, re-applied on conflict),
// and each instance reads its own writes and the other's at once.
func TestExpressConcurrentGoUpdates(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ex := expressSide(t, r, nil)
		a := goSide(t, guideExpressConfig(r, r.Client()))
		bURL := goSide(t, guideExpressConfig(r, r.Client()))
		br := newJar(t)
		code, _ := br.call(http.MethodPost, ex.URL+"/login", map[string]string{"username": "alice"})
		require.Equal(t, http.StatusOK, code)
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				side := a
				if i%2 == 1 {
					side = bURL
				}
				code, _ := br.call(http.MethodPost, side+"/session/set", map[string]int{fmt.Sprintf("k%02d", i): i})
				require.Equal(t, http.StatusNoContent, code)
			}()
		}
		wg.Wait()
		for _, side := range []string{a, bURL, ex.URL} {
			_, dump := br.call(http.MethodGet, side+"/session/dump", nil)
			for i := range 20 {
				require.Equal(t, json.Number(fmt.Sprint(i)), dump[fmt.Sprintf("k%02d", i)], "k%02d on %s", i, side)
			}
			require.Equal(t, json.Number("1"), dump["userId"])
		}
		// Read-your-writes across instances: a write on A is read on B at
		// once (no client-side caching of Express sessions).
		for i := range 10 {
			code, _ := br.call(http.MethodPost, a+"/session/set", map[string]int{"counter": i})
			require.Equal(t, http.StatusNoContent, code)
			_, dump := br.call(http.MethodGet, bURL+"/session/dump", nil)
			require.Equal(t, json.Number(fmt.Sprint(i)), dump["counter"])
		}
	})
}

// TestExpressBadInput: a stored blob that is not a session (not JSON, no
// cookie object) is a new session, not a 500; a value over MaxSize gets
// 413 and changes nothing; express-session's own keys are refused.
func TestExpressBadInput(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		ctx := context.Background()
		cfg := guideExpressConfig(r, client)
		cfg.MaxSize = 4096
		goURL := goSide(t, cfg)
		b, key := goLogin(t, goURL, cfg.KeyPrefix)
		stored := sessionBlob(t, client, key)

		code, out := b.call(http.MethodPost, goURL+"/session/set", map[string]string{"big": strings.Repeat("x", 5000)})
		require.Equal(t, http.StatusRequestEntityTooLarge, code, "%v", out)
		require.Equal(t, stored, sessionBlob(t, client, key), "nothing changed")
		for _, k := range []string{"cookie", "id", "save"} {
			code, _ := b.call(http.MethodPost, goURL+"/session/set", map[string]int{k: 1})
			require.Equal(t, http.StatusBadRequest, code, k)
		}
		require.Equal(t, stored, sessionBlob(t, client, key))

		for _, blob := range []string{`not json`, `{"userId":1}`, `[1,2]`, `{"cookie":1}`, `{"cookie":{}} trailing`} {
			require.NoError(t, client.Do(ctx, client.B().Set().Key(key).Value(blob).Build()).Error())
			code, _ := b.call(http.MethodGet, goURL+"/profile", nil)
			require.Equal(t, http.StatusUnauthorized, code, blob)
		}
	})
}

// TestExpressWholeBlobWrites shows what connect-redis's whole-blob writes
// mean for Go, as the README states them.
func TestExpressWholeBlobWrites(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ex := expressSide(t, r, nil)
		goURL := goSide(t, guideExpressConfig(r, r.Client()))
		login := func() *jar {
			b := newJar(t)
			code, _ := b.call(http.MethodPost, ex.URL+"/login", map[string]string{"username": "alice"})
			require.Equal(t, http.StatusOK, code)
			return b
		}
		// inFlight starts an Express request that loads the session now and
		// writes it whole 400 ms later.
		inFlight := func(b *jar) <-chan int {
			done := make(chan int, 1)
			go func() {
				code, _ := b.call(http.MethodPost, ex.URL+"/session/set?delay=400", map[string]string{"fromExpress": "yes"})
				done <- code
			}()
			time.Sleep(150 * time.Millisecond) // it has loaded the session
			return done
		}

		t.Run("an Express write overwrites Go's changes made since it loaded", func(t *testing.T) {
			b := login()
			done := inFlight(b)
			code, _ := b.call(http.MethodPost, goURL+"/session/set", map[string]string{"theme": "dark"})
			require.Equal(t, http.StatusNoContent, code)
			require.Equal(t, http.StatusOK, <-done)
			_, dump := b.call(http.MethodGet, goURL+"/session/dump", nil)
			require.Equal(t, "yes", dump["fromExpress"])
			require.NotContains(t, dump, "theme", "lost to Express's whole-blob SET")
		})
		t.Run("an Express request in flight re-creates a session Go destroyed", func(t *testing.T) {
			b := login()
			done := inFlight(b)
			code, _ := b.call(http.MethodPost, goURL+"/logout", nil)
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, http.StatusOK, <-done)
			code, _ = b.call(http.MethodGet, goURL+"/profile", nil)
			require.Equal(t, http.StatusOK, code, "connect-redis's plain SET brought it back")
		})
		t.Run("Express requests that only read keep Go's changes", func(t *testing.T) {
			b := login()
			code, _ := b.call(http.MethodPost, goURL+"/session/set", map[string]string{"theme": "dark"})
			require.Equal(t, http.StatusNoContent, code)
			for range 3 {
				code, _ := b.call(http.MethodGet, ex.URL+"/profile", nil)
				require.Equal(t, http.StatusOK, code)
			}
			_, dump := b.call(http.MethodGet, goURL+"/session/dump", nil)
			require.Equal(t, "dark", dump["theme"])
		})
		t.Run("Express's regenerate drops the data; Go's keeps it", func(t *testing.T) {
			b := login()
			code, _ := b.call(http.MethodPost, goURL+"/session/set", map[string]string{"theme": "dark"})
			require.Equal(t, http.StatusNoContent, code)
			old := b.cookie(goURL, "sessionId")
			code, _ = b.call(http.MethodPost, goURL+"/login", map[string]string{"username": "alice"}) // Go's login regenerates
			require.Equal(t, http.StatusOK, code)
			require.NotEqual(t, old, b.cookie(goURL, "sessionId"), "a new ID")
			_, dump := b.call(http.MethodGet, ex.URL+"/session/dump", nil)
			require.Equal(t, "dark", dump["theme"], "Go's regenerate kept it")
			code, _ = b.call(http.MethodPost, ex.URL+"/session/regenerate", nil)
			require.Equal(t, http.StatusOK, code)
			_, dump = b.call(http.MethodGet, goURL+"/session/dump", nil)
			require.Empty(t, dump, "Express's regenerate dropped everything")
		})
	})
}

// TestExpressExpiry: Go decides expiry from the key's TTL, never from the
// stored cookie.expires; a read that changes nothing extends a session
// once a quarter of its TTL has passed, as Express's touch does.
func TestExpressExpiry(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		ctx := context.Background()
		cfg := guideExpressConfig(r, client)
		goURL := goSide(t, cfg)
		b, key := goLogin(t, goURL, cfg.KeyPrefix)
		pttl := func() time.Duration {
			ms, err := client.Do(ctx, client.B().Pttl().Key(key).Build()).AsInt64()
			require.NoError(t, err)
			return time.Duration(ms) * time.Millisecond
		}
		require.Greater(t, pttl(), 23*time.Hour, "the cookie's max age")

		// A stale cookie.expires does not end a live session.
		blob := sessionBlob(t, client, key)
		stale := strings.Replace(blob, `"expires":"`, `"expires":"2001-01-01T00:00:00.000Z","x":"`, 1)
		require.NoError(t, client.Do(ctx, client.B().Set().Key(key).Value(stale).Px(time.Hour).Build()).Error())
		code, _ := b.call(http.MethodGet, goURL+"/profile", nil)
		require.Equal(t, http.StatusOK, code)
		require.Greater(t, pttl(), 23*time.Hour, "an hour left of 24: the read extended it")

		// The TTL ends it.
		require.NoError(t, client.Do(ctx, client.B().Pexpire().Key(key).Milliseconds(100).Build()).Error())
		time.Sleep(200 * time.Millisecond)
		code, _ = b.call(http.MethodGet, goURL+"/profile", nil)
		require.Equal(t, http.StatusUnauthorized, code)
	})
}

// TestExpressSetCookieMatches: the Set-Cookie Go sends has the attributes
// of the one Express sends for the same options.
func TestExpressSetCookieMatches(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ex := expressSide(t, r, nil)
		goURL := goSide(t, guideExpressConfig(r, r.Client()))
		attrs := func(base string) []string {
			resp, err := http.Post(base+"/login", "application/json", strings.NewReader(`{"username":"alice"}`))
			require.NoError(t, err)
			_ = resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode)
			parts := strings.Split(resp.Header.Get("Set-Cookie"), "; ")
			require.True(t, strings.HasPrefix(parts[0], "sessionId=s%3A"), parts[0])
			var out []string
			for _, p := range parts[1:] {
				if strings.HasPrefix(p, "Expires=") {
					exp, err := http.ParseTime(strings.TrimPrefix(p, "Expires="))
					require.NoError(t, err)
					require.InDelta(t, 24*time.Hour.Seconds(), time.Until(exp).Seconds(), 5)
					p = "Expires"
				}
				out = append(out, p)
			}
			return out
		}
		require.Equal(t, attrs(ex.URL), attrs(goURL))
	})
}

// TestExpressRedisDown: with Redis frozen, a request that uses the
// session answers 503 within its deadline (no internal text), or runs
// with an empty, unsaved session under Degrade; nothing stored changes.
func TestExpressRedisDown(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		client := f.Client()
		for _, degrade := range []bool{false, true} {
			cfg := guideExpressConfig(f.testRedis, client)
			cfg.Timeout = 300 * time.Millisecond
			cfg.Breaker = NewBreaker(BreakerConfig{Failures: 100, Cooldown: 100 * time.Millisecond})
			cfg.Degrade = degrade
			goURL := goSide(t, cfg)
			b, key := goLogin(t, goURL, cfg.KeyPrefix)
			stored := sessionBlob(t, client, key)
			f.Pause(t)
			t0 := time.Now()
			code, out := b.call(http.MethodPost, goURL+"/session/set", map[string]string{"theme": "dark"})
			if degrade {
				require.Equal(t, http.StatusNoContent, code, "%v", out)
			} else {
				require.Equal(t, http.StatusServiceUnavailable, code)
				require.Equal(t, "session store unavailable", out["error"])
			}
			require.Less(t, time.Since(t0), 3*time.Second)
			f.Resume(t)
			require.Equal(t, stored, sessionBlob(t, client, key), "nothing written (degrade %v)", degrade)
			code, _ = b.call(http.MethodGet, goURL+"/profile", nil)
			require.Equal(t, http.StatusOK, code, "the session lives on")
		}
	})
}

// TestExpressClear: Clear drops every value but keeps express-session's
// cookie object and the session's ID; values set after it stay.
func TestExpressClear(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		cfg := guideExpressConfig(r, client)
		mw, err := cfg.ToMiddleware()
		require.NoError(t, err)
		e := echo.New()
		e.Use(mw)
		e.POST("/clear", func(c echo.Context) error {
			s, _ := GetSession(c)
			return errors.Join(s.Clear(), s.Set("after", true))
		})
		srv := httptest.NewServer(e)
		t.Cleanup(srv.Close)
		ex := expressSide(t, r, nil)
		b := newJar(t)
		code, _ := b.call(http.MethodPost, ex.URL+"/login", map[string]string{"username": "alice"})
		require.Equal(t, http.StatusOK, code)
		id := sessionIDOf(t, b.cookie(ex.URL, "sessionId"))
		code, _ = b.call(http.MethodPost, srv.URL+"/clear", nil)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, id, sessionIDOf(t, b.cookie(ex.URL, "sessionId")), "the same session")
		_, dump := b.call(http.MethodGet, ex.URL+"/session/dump", nil)
		require.Contains(t, dump, "cookie")
		require.Equal(t, true, dump["after"])
		require.NotContains(t, dump, "userId")
	})
}

// TestExpressReviewFindings: each case failed before its fix.
func TestExpressReviewFindings(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		ctx := context.Background()
		cfg := guideExpressConfig(r, client)
		cfg.MaxSize = 4096
		goURL := goSide(t, cfg)
		login := func() (*jar, string) { return goLogin(t, goURL, cfg.KeyPrefix) }

		t.Run("the gorilla API refuses an Express store", func(t *testing.T) {
			st, err := NewExpressSessionStore(cfg)
			require.NoError(t, err)
			gs := NewGorillaStore(st)
			s, err := gs.New(httptest.NewRequest(http.MethodGet, "/", nil), "sessionId")
			require.ErrorIs(t, err, ErrNotInExpressMode)
			require.NotNil(t, s)
			require.ErrorIs(t, gs.Save(httptest.NewRequest(http.MethodGet, "/", nil), httptest.NewRecorder(), s), ErrNotInExpressMode)
		})
		t.Run("a session Express grew past MaxSize may still shrink", func(t *testing.T) {
			b, key := login()
			blob := sessionBlob(t, client, key)
			big := strings.TrimSuffix(blob, "}") + `,"cart":"` + strings.Repeat("x", 5000) + `"}`
			require.NoError(t, client.Do(ctx, client.B().Set().Key(key).Value(big).Px(time.Hour).Build()).Error())
			code, _ := b.call(http.MethodPost, goURL+"/session/delete?key=userId", nil)
			require.Equal(t, http.StatusNoContent, code)
			require.Less(t, len(sessionBlob(t, client, key)), len(big))
			code, _ = b.call(http.MethodPost, goURL+"/session/set", map[string]string{"more": "x"})
			require.Equal(t, http.StatusRequestEntityTooLarge, code, "but not grow")
		})
		t.Run("a stale cookie gets no clearing Set-Cookie", func(t *testing.T) {
			b, _ := login()
			old := b.cookie(goURL, "sessionId")
			code, _ := b.call(http.MethodPost, goURL+"/login", map[string]string{"username": "alice"}) // regenerates
			require.Equal(t, http.StatusOK, code)
			for _, path := range []string{"/profile", "/session/set"} {
				req, _ := http.NewRequest(http.MethodPost, goURL+path, strings.NewReader(`{"x":1}`))
				if path == "/profile" {
					req.Method = http.MethodGet
				}
				req.AddCookie(&http.Cookie{Name: "sessionId", Value: old})
				resp, err := http.DefaultClient.Do(req)
				require.NoError(t, err)
				_ = resp.Body.Close()
				if path == "/profile" {
					require.Empty(t, resp.Header.Values("Set-Cookie"), path)
					continue
				}
				// A write starts a new session, as Express's would: a new
				// cookie, never a clearing one.
				sc := resp.Header.Get("Set-Cookie")
				require.NotContains(t, sc, "1970", path)
				require.NotContains(t, sc, old, path)
			}
		})
		t.Run("a browser-session cookie chosen per session stays one", func(t *testing.T) {
			b, key := login()
			blob := sessionBlob(t, client, key)
			i := strings.Index(blob, `"cookie":{`) + len(`"cookie":`)
			j := i + strings.Index(blob[i:], "}") + 1
			browser := blob[:i] + `{"originalMaxAge":null,"expires":null,"secure":false,"httpOnly":true,"path":"/","sameSite":"lax"}` + blob[j:]
			require.NoError(t, client.Do(ctx, client.B().Set().Key(key).Value(browser).Px(time.Hour).Build()).Error())
			req, _ := http.NewRequest(http.MethodPost, goURL+"/session/set", strings.NewReader(`{"theme":"dark"}`))
			req.AddCookie(&http.Cookie{Name: "sessionId", Value: b.cookie(goURL, "sessionId")})
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			_ = resp.Body.Close()
			require.Equal(t, http.StatusNoContent, resp.StatusCode)
			sc := resp.Header.Get("Set-Cookie")
			require.NotEmpty(t, sc)
			require.NotContains(t, sc, "Expires=", "no persistent cookie for a session that chose a browser-session one")
		})
	})
}

func TestEncodeURIComponent(t *testing.T) {
	for in, want := range map[string]string{
		"s:abc.def+/=":  "s%3Aabc.def%2B%2F%3D",
		"a-_.!~*'()z09": "a-_.!~*'()z09",
		"; ,\"\\%é":     "%3B%20%2C%22%5C%25%C3%A9",
	} {
		require.Equal(t, want, encodeURIComponent(in), in)
	}
}

// TestExpressConcurrentWithExpress: Go updates racing Express writes of
// other keys never lose an Express field (Go merges into whatever Express
// wrote); Go's own updates may be lost only to Express's whole-blob
// writes, as the README says.
func TestExpressConcurrentWithExpress(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ex := expressSide(t, r, nil)
		goURL := goSide(t, guideExpressConfig(r, r.Client()))
		b := newJar(t)
		code, _ := b.call(http.MethodPost, ex.URL+"/login", map[string]string{"username": "alice"})
		require.Equal(t, http.StatusOK, code)
		// Express writes one after another (each loads the last blob, so
		// they never overwrite each other), while Go writes race them.
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 10 {
				code, _ := b.call(http.MethodPost, ex.URL+"/session/set", map[string]int{fmt.Sprintf("e%02d", i): i})
				require.Equal(t, http.StatusOK, code)
			}
		}()
		for i := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				code, _ := b.call(http.MethodPost, goURL+"/session/set", map[string]int{fmt.Sprintf("g%02d", i): i})
				require.Equal(t, http.StatusNoContent, code)
			}()
		}
		wg.Wait()
		_, dump := b.call(http.MethodGet, ex.URL+"/session/dump", nil)
		require.Equal(t, json.Number("1"), dump["userId"])
		for i := range 10 {
			require.Equal(t, json.Number(fmt.Sprint(i)), dump[fmt.Sprintf("e%02d", i)], "no Go write dropped Express's e%02d", i)
		}
		goKeys := 0
		for k := range dump {
			if strings.HasPrefix(k, "g") {
				goKeys++
			}
		}
		t.Logf("20 Go writes racing 10 Express writes: %d of Go's keys survived Express's whole-blob writes", goKeys)
		// Sequential: a Go write right after an Express write keeps it.
		code, _ = b.call(http.MethodPost, ex.URL+"/session/set", map[string]string{"last": "express"})
		require.Equal(t, http.StatusOK, code)
		code, _ = b.call(http.MethodPost, goURL+"/session/set", map[string]string{"after": "go"})
		require.Equal(t, http.StatusNoContent, code)
		_, dump = b.call(http.MethodGet, ex.URL+"/session/dump", nil)
		require.Equal(t, "express", dump["last"])
		require.Equal(t, "go", dump["after"])
	})
}

// TestExpressBadBlobLoggedOnce: an unreadable stored session is logged
// once, however many requests bring its cookie, and the log names neither
// the session's key nor its ID.
func TestExpressBadBlobLoggedOnce(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		var log redistest.SyncBuffer
		cfg := guideExpressConfig(r, client)
		cfg.Logger = slog.New(slog.NewTextHandler(&log, nil))
		goURL := goSide(t, cfg)
		b := newJar(t)
		code, _ := b.call(http.MethodPost, goURL+"/login", map[string]string{"username": "alice"})
		require.Equal(t, http.StatusOK, code)
		id := sessionIDOf(t, b.cookie(goURL, "sessionId"))
		require.NoError(t, client.Do(context.Background(), client.B().Set().Key(cfg.KeyPrefix+id).Value("{broken").Build()).Error())
		for range 3 {
			code, _ := b.call(http.MethodGet, goURL+"/profile", nil)
			require.Equal(t, http.StatusUnauthorized, code)
		}
		require.Equal(t, 1, strings.Count(log.String(), "not session JSON"), log.String())
		require.NotContains(t, log.String(), id)
	})
}

// TestExpressSecondReview: each case failed before its fix.
func TestExpressSecondReview(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		ctx := context.Background()
		cfg := guideExpressConfig(r, client)
		cfg.MaxSize = 4096
		goURL := goSide(t, cfg)

		t.Run("keys Express would drop or mangle are refused", func(t *testing.T) {
			b, key := goLogin(t, goURL, cfg.KeyPrefix)
			before := sessionBlob(t, client, key)
			for _, k := range []string{"toString", "hasOwnProperty", "valueOf"} {
				code, _ := b.call(http.MethodPost, goURL+"/session/set", map[string]int{k: 1})
				require.Equal(t, http.StatusBadRequest, code, "%q", k)
			}
			require.Equal(t, before, sessionBlob(t, client, key))
			// A key that is not UTF-8 would be stored as U+FFFD.
			mw, err := cfg.ToMiddleware()
			require.NoError(t, err)
			e := echo.New()
			e.GET("/", func(c echo.Context) error {
				s, _ := GetSession(c)
				require.ErrorIs(t, s.Set("\xff", 1), ErrInvalidSessionKey)
				return c.NoContent(http.StatusOK)
			}, mw)
			e.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
		})
		t.Run("a blob with a repeated key is still a session", func(t *testing.T) {
			b, key := goLogin(t, goURL, cfg.KeyPrefix)
			blob := sessionBlob(t, client, key)
			dup := strings.TrimSuffix(blob, "}") + `,"\ud800":1,"\ud801":2}`
			require.NoError(t, client.Do(ctx, client.B().Set().Key(key).Value(dup).Px(time.Hour).Build()).Error())
			code, _ := b.call(http.MethodGet, goURL+"/profile", nil)
			require.Equal(t, http.StatusOK, code)
		})
		t.Run("MaxSize counts the stored JSON, not the native per-value overhead", func(t *testing.T) {
			b, key := goLogin(t, goURL, cfg.KeyPrefix)
			many := map[string]int{}
			for i := range 110 {
				many[fmt.Sprintf("v%03d", i)] = i
			}
			code, _ := b.call(http.MethodPost, goURL+"/session/set", many)
			require.Equal(t, http.StatusNoContent, code)
			require.Less(t, len(sessionBlob(t, client, key)), 2500)
			code, _ = b.call(http.MethodPost, goURL+"/session/set", map[string]string{"theme": "dark"})
			require.Equal(t, http.StatusNoContent, code, "far under MaxSize")
		})
		t.Run("rolling sends the cookie again on every response", func(t *testing.T) {
			rolling := cfg
			rolling.Cookie.Rolling = true
			rURL := goSide(t, rolling)
			b, _ := goLogin(t, rURL, cfg.KeyPrefix)
			req, _ := http.NewRequest(http.MethodGet, rURL+"/profile", nil)
			req.AddCookie(&http.Cookie{Name: "sessionId", Value: b.cookie(rURL, "sessionId")})
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			_ = resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.Contains(t, resp.Header.Get("Set-Cookie"), "Expires=")
		})
	})
}

// TestExpressStreamEndsWithSession: a stream opened with an Express
// session ends once the session is gone (a logout on the Express app, or
// expiry), through the stream's session check.
func TestExpressStreamEndsWithSession(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		cfg := guideExpressConfig(r, client)
		mw, err := cfg.ToMiddleware()
		require.NoError(t, err)
		e := echo.New()
		e.Use(mw)
		var alive func(ctx context.Context) (bool, error)
		e.GET("/check", func(c echo.Context) error {
			alive = sessionAlive(c)
			return c.NoContent(http.StatusOK)
		})
		srv := httptest.NewServer(e)
		t.Cleanup(srv.Close)
		ex := expressSide(t, r, nil)
		b := newJar(t)
		code, _ := b.call(http.MethodPost, ex.URL+"/login", map[string]string{"username": "alice"})
		require.Equal(t, http.StatusOK, code)
		code, _ = b.call(http.MethodGet, srv.URL+"/check", nil)
		require.Equal(t, http.StatusOK, code)
		require.NotNil(t, alive, "a logged-in Express session gets a session check")
		ok, err := alive(context.Background())
		require.NoError(t, err)
		require.True(t, ok)
		code, _ = b.call(http.MethodPost, ex.URL+"/logout", nil)
		require.Equal(t, http.StatusOK, code)
		ok, err = alive(context.Background())
		require.NoError(t, err)
		require.False(t, ok, "gone after the Express logout")
	})
}

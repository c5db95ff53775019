package redisecho

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
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
	e.GET("/whoami", func(c echo.Context) error {
		s := sess(c)
		return c.JSON(http.StatusOK, map[string]string{"user": s.UserID(), "handle": s.Handle()})
	})
	e.GET("/untouched", func(c echo.Context) error { return c.String(http.StatusOK, "static") })
	e.POST("/late", func(c echo.Context) error {
		require.NoError(t, c.String(http.StatusOK, "done"))
		return sess(c).Set("late", "x")
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

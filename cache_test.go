package redisecho

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newCacheStore(t *testing.T, r *testRedis, client rueidis.Client, mod func(*CacheStoreConfig)) *CacheStore {
	t.Helper()
	cfg := CacheStoreConfig{Client: client, Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()}}
	if mod != nil {
		mod(&cfg)
	}
	cs, err := NewCacheStore(cfg)
	require.NoError(t, err)
	return cs
}

func ctx5s(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestCacheEntryRoundTrip(t *testing.T) {
	e := &entry{stored: 1, fresh: 2, stale: 3, status: 200, tags: []tagGen{{"products", 4}, {"p:{7}", 0}},
		header: http.Header{"Content-Type": {"application/json"}, "X-A": {"1", "2"}}, body: []byte(`{"ok":true}`)}
	got, err := decodeEntry(string(e.encode()))
	require.NoError(t, err)
	assert.Equal(t, e.stored, got.stored)
	assert.Equal(t, e.fresh, got.fresh)
	assert.Equal(t, e.stale, got.stale)
	assert.Equal(t, e.status, got.status)
	assert.Equal(t, e.tags, got.tags)
	assert.Equal(t, e.header, got.header)
	assert.Equal(t, e.body, got.body)
}

// FuzzDecodeEntryNeverPanics: a corrupt stored entry is a miss, never a
// panic.
func FuzzDecodeEntryNeverPanics(f *testing.F) {
	good := (&entry{stored: 1, fresh: 2, stale: 3, status: 200, tags: []tagGen{{"t", 1}}, header: http.Header{"A": {"b"}}, body: []byte("x")}).encode()
	f.Add(good)
	f.Add([]byte("RE1"))
	f.Add([]byte("garbage"))
	f.Add(good[:len(good)/2])
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := decodeEntry(string(data))
		if err == nil {
			require.NotNil(t, e)
			require.GreaterOrEqual(t, e.stale, e.fresh)
		}
	})
}

func TestCacheServiceGetSetDelete(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		var v map[string]int
		ok, err := cs.Get(ctx, "user:1", &v)
		require.NoError(t, err)
		require.False(t, ok)

		require.NoError(t, cs.Set(ctx, "user:1", map[string]int{"id": 1}, time.Minute))
		ok, err = cs.Get(ctx, "user:1", &v)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, map[string]int{"id": 1}, v)

		require.NoError(t, cs.Set(ctx, "user:1", map[string]int{"id": 2}, time.Minute))
		ok, _ = cs.Get(ctx, "user:1", &v)
		require.True(t, ok)
		require.Equal(t, 2, v["id"], "read-your-own-write through the local cache")

		require.NoError(t, cs.Delete(ctx, "user:1"))
		ok, err = cs.Get(ctx, "user:1", &v)
		require.NoError(t, err)
		require.False(t, ok, "read-your-own-delete")

		require.Error(t, cs.Set(ctx, "bad", func() {}, time.Minute), "a value that cannot be encoded")
		require.ErrorIs(t, cs.Set(ctx, "", 1, time.Minute), ErrInvalidCacheKey)
		require.ErrorIs(t, cs.Set(ctx, "k", 1, time.Minute, ""), ErrInvalidCacheKey)
		require.NoError(t, cs.Set(ctx, "{hostile}:key%", "v", time.Minute, "{tag}"))
		var s string
		ok, err = cs.Get(ctx, "{hostile}:key%", &s)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, "v", s)
	})
}

func TestCacheExpiry(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		clock := newFakeClock()
		cs := newCacheStore(t, r, r.Client(), func(c *CacheStoreConfig) { c.Clock = clock })
		ctx := ctx5s(t)
		require.NoError(t, cs.Set(ctx, "k", 1, time.Minute))
		var n int
		ok, _ := cs.Get(ctx, "k", &n)
		require.True(t, ok)
		clock.Advance(61 * time.Second)
		ok, _ = cs.Get(ctx, "k", &n)
		require.False(t, ok, "expired")
	})
}

func TestCacheCorruptEntryIsReplaced(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		cs := newCacheStore(t, r, c, nil)
		ctx := ctx5s(t)
		for _, garbage := range []string{"not an entry", "RE1\x00", string((&entry{fresh: 1 << 62, stale: 1 << 62, body: []byte("{bad json")}).encode())} {
			require.NoError(t, c.Do(ctx, c.B().Set().Key(cs.entryKey("k")).Value(garbage).Build()).Error())
			cs.markDelete(cs.entryKey("k"))
			calls := 0
			v, err := Remember(ctx, cs, "k", time.Minute, func(context.Context) (int, error) { calls++; return 42, nil })
			require.NoError(t, err)
			require.Equal(t, 42, v)
			require.Equal(t, 1, calls)
			v, err = Remember(ctx, cs, "k", time.Minute, func(context.Context) (int, error) { calls++; return 0, nil })
			require.NoError(t, err)
			require.Equal(t, 42, v, "replaced, then served")
			require.Equal(t, 1, calls)
		}
	})
}

func TestRemember(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		var calls atomic.Int32
		get := func() (string, error) {
			return Remember(ctx, cs, "greeting", time.Minute, func(context.Context) (string, error) {
				calls.Add(1)
				return "hello", nil
			})
		}
		for range 5 {
			v, err := get()
			require.NoError(t, err)
			require.Equal(t, "hello", v)
		}
		require.Equal(t, int32(1), calls.Load())

		// Errors are returned and not cached.
		boom := errors.New("boom")
		_, err := Remember(ctx, cs, "failing", time.Minute, func(context.Context) (int, error) { return 0, boom })
		require.ErrorIs(t, err, boom)
		v, err := Remember(ctx, cs, "failing", time.Minute, func(context.Context) (int, error) { return 7, nil })
		require.NoError(t, err)
		require.Equal(t, 7, v)

		// Not found is cached only when asked.
		var lookups atomic.Int32
		missing := func() (int, error) {
			return Remember(ctx, cs, "user:999", time.Minute, func(context.Context) (int, error) {
				lookups.Add(1)
				return 0, ErrCacheNotFound
			}, CacheNotFound(time.Minute))
		}
		for range 3 {
			_, err := missing()
			require.ErrorIs(t, err, ErrCacheNotFound)
		}
		require.Equal(t, int32(1), lookups.Load())
	})
}

func TestCacheTags(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		version := 0
		get := func(key string, tags ...string) int {
			v, err := Remember(ctx, cs, key, time.Minute, func(context.Context) (int, error) { return version, nil }, WithTags(tags...))
			require.NoError(t, err)
			return v
		}
		require.Equal(t, 0, get("products", "products"))
		require.Equal(t, 0, get("product:7", "products", "product:7"))
		require.Equal(t, 0, get("product:8", "products", "product:8"))
		require.Equal(t, 0, get("users", "users"))
		version = 1
		require.NoError(t, cs.InvalidateTags(ctx, "product:7"))
		require.Equal(t, 1, get("product:7", "products", "product:7"), "invalidated")
		require.Equal(t, 0, get("product:8", "products", "product:8"), "other tags untouched")
		require.NoError(t, cs.InvalidateTags(ctx, "products"))
		require.Equal(t, 1, get("products", "products"))
		require.Equal(t, 1, get("product:8", "products", "product:8"))
		require.Equal(t, 0, get("users", "users"))
		require.ErrorIs(t, cs.InvalidateTags(ctx, ""), ErrInvalidCacheKey)
	})
}

// TestCacheTagRace: a fill that started before an invalidation and finished
// after it must not survive it.
func TestCacheTagRace(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheStore(t, r, r.Client(), nil)
		b := newCacheStore(t, r, r.Client(), nil) // another instance
		ctx := ctx5s(t)
		for i := range 20 {
			key := fmt.Sprint("race", i)
			finish := fillInFlight(ctx, a, key, "old", WithTags("race"))
			inv := a
			if i%2 == 1 {
				inv = b
			}
			require.NoError(t, inv.InvalidateTags(ctx, "race"))
			require.NoError(t, finish())
			for _, st := range []*CacheStore{a, b} {
				require.Eventually(t, func() bool {
					v, err := Remember(ctx, st, key, time.Minute, func(context.Context) (string, error) { return "new", nil }, WithTags("race"))
					return err == nil && v == "new"
				}, 5*time.Second, 5*time.Millisecond, "the fill that raced the invalidation was served")
			}
		}
	})
}

// fillInFlight starts a Remember of key whose function blocks, and returns
// once the function runs; finish lets it return value and waits for
// Remember's result.
func fillInFlight(ctx context.Context, cs *CacheStore, key, value string, opts ...RememberOption) (finish func() error) {
	started, release, done := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	go func() {
		_, err := Remember(ctx, cs, key, time.Minute, func(context.Context) (string, error) {
			close(started)
			<-release
			return value, nil
		}, opts...)
		done <- err
	}()
	<-started
	return func() error {
		close(release)
		return <-done
	}
}

// TestCacheReadYourOwnInvalidation: the instance that invalidates never
// serves the old entry again; another instance stops when the
// invalidation reaches it.
func TestCacheReadYourOwnInvalidation(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheStore(t, r, r.Client(), nil)
		b := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		for i := range 300 {
			want := fmt.Sprint("v", i)
			get := func(st *CacheStore) string {
				v, err := Remember(ctx, st, "hot", time.Minute, func(context.Context) (string, error) { return want, nil }, WithTags("hot"))
				require.NoError(t, err)
				return v
			}
			// Both instances hold the entry in their local caches.
			get(a)
			get(b)
			get(a)
			get(b)
			next := fmt.Sprint("v", i+1)
			switch i % 3 {
			case 0:
				require.NoError(t, a.InvalidateTags(ctx, "hot"))
			case 1:
				require.NoError(t, a.Delete(ctx, "hot"))
			case 2:
				require.NoError(t, a.Set(ctx, "hot", next, time.Minute, "hot"))
			}
			want = next
			require.Equal(t, want, get(a), "round %d: the invalidating instance served the old value", i)
			require.Eventually(t, func() bool { return get(b) == want }, 2*time.Second, time.Millisecond)
		}
	})
}

func TestCacheFlush(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		cs := newCacheStore(t, r, c, nil)
		ctx := ctx5s(t)
		for i := range 50 {
			require.NoError(t, cs.Set(ctx, fmt.Sprint("user:", i), i, time.Minute))
			require.NoError(t, cs.Set(ctx, fmt.Sprint("product:", i), i, time.Minute))
		}
		n, err := cs.Flush(ctx, "user:*")
		require.NoError(t, err)
		require.Equal(t, 50, n)
		var v int
		for i := range 50 {
			ok, err := cs.Get(ctx, fmt.Sprint("user:", i), &v)
			require.NoError(t, err)
			require.False(t, ok, "flushed, and this instance knows at once")
			ok, _ = cs.Get(ctx, fmt.Sprint("product:", i), &v)
			require.True(t, ok, "not matched by the pattern")
		}
		n, err = cs.Flush(ctx, "*")
		require.NoError(t, err)
		require.Equal(t, 50, n)
	})
}

// cacheApp is one instance with the response cache and counted handlers.
type cacheApp struct {
	store *CacheStore
	srv   *httptest.Server
	calls sync.Map // path -> *atomic.Int32
}

func (a *cacheApp) count(path string) int32 {
	v, _ := a.calls.LoadOrStore(path, new(atomic.Int32))
	return v.(*atomic.Int32).Load()
}

func newCacheApp(t *testing.T, r *testRedis, client rueidis.Client, mod func(*CacheConfig)) *cacheApp {
	t.Helper()
	a := &cacheApp{store: newCacheStore(t, r, client, nil)}
	cfg := CacheConfig{Store: a.store, TTL: time.Minute}
	if mod != nil {
		mod(&cfg)
	}
	mw, err := cfg.ToMiddleware()
	require.NoError(t, err)
	e := echo.New()
	e.HideBanner = true
	hit := func(c echo.Context) {
		v, _ := a.calls.LoadOrStore(c.Path(), new(atomic.Int32))
		v.(*atomic.Int32).Add(1)
	}
	g := e.Group("", mw)
	g.GET("/products", func(c echo.Context) error {
		hit(c)
		return c.JSON(http.StatusOK, map[string]any{"q": c.QueryParams(), "lang": c.Request().Header.Get("Accept-Language")})
	})
	g.GET("/products/:id", func(c echo.Context) error {
		hit(c)
		if c.Param("id") == "404" {
			return c.JSON(http.StatusNotFound, map[string]string{"error": "not found"})
		}
		return c.JSON(http.StatusOK, map[string]string{"id": c.Param("id")})
	})
	g.GET("/status/:code", func(c echo.Context) error {
		hit(c)
		code := 0
		fmt.Sscan(c.Param("code"), &code)
		return c.String(code, "status")
	})
	// Routes whose only difference is one response header.
	for path, header := range map[string][2]string{
		"/nostore":   {"Cache-Control", "no-store"},
		"/private":   {"Cache-Control", "private, max-age=60"},
		"/cookie":    {"Set-Cookie", "a=b"},
		"/vary-star": {"Vary", "*"},
	} {
		g.GET(path, func(c echo.Context) error {
			hit(c)
			c.Response().Header().Set(header[0], header[1])
			return c.String(http.StatusOK, "x")
		})
	}
	g.GET("/big", func(c echo.Context) error {
		hit(c)
		return c.String(http.StatusOK, strings.Repeat("b", 2048))
	})
	g.GET("/etag", func(c echo.Context) error {
		hit(c)
		c.Response().Header().Set("ETag", `"v1"`)
		return c.String(http.StatusOK, "tagged")
	})
	g.GET("/error", func(c echo.Context) error {
		hit(c)
		return echo.NewHTTPError(http.StatusTeapot, "handler error")
	})
	g.GET("/slow", func(c echo.Context) error {
		hit(c)
		time.Sleep(200 * time.Millisecond)
		return c.String(http.StatusOK, "slow")
	})
	g.GET("/stream", func(c echo.Context) error {
		hit(c)
		c.Response().WriteHeader(http.StatusOK)
		_, _ = c.Response().Write([]byte("a"))
		c.Response().Flush()
		_, _ = c.Response().Write([]byte("b"))
		return nil
	})
	a.srv = httptest.NewServer(e)
	t.Cleanup(a.srv.Close)
	return a
}

func (a *cacheApp) get(t *testing.T, path string, headers ...string) reply {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, a.srv.URL+path, nil)
	require.NoError(t, err)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return reply{code: resp.StatusCode, header: resp.Header, body: string(body)}
}

func TestCacheMiddlewareHitsAndMisses(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheApp(t, r, r.Client(), nil)
		first := a.get(t, "/products?b=2&a=1")
		require.Equal(t, http.StatusOK, first.code)
		require.Equal(t, "MISS", first.header.Get("X-Cache"))
		require.NotEmpty(t, first.header.Get("ETag"))
		second := a.get(t, "/products?a=1&b=2")
		require.Equal(t, "HIT", second.header.Get("X-Cache"), "the query order does not matter")
		require.Equal(t, first.body, second.body)
		require.Equal(t, first.header.Get("ETag"), second.header.Get("ETag"))
		require.Equal(t, "application/json", second.header.Get("Content-Type"))
		require.NotEmpty(t, second.header.Get("Age"))
		require.Equal(t, int32(1), a.count("/products"))

		// Different query values, Vary headers and paths are other entries.
		require.Equal(t, "MISS", a.get(t, "/products?a=1&b=3").header.Get("X-Cache"))
		require.Equal(t, "MISS", a.get(t, "/products?a=1&b=2", "Accept-Language", "fr").header.Get("X-Cache"))
		require.Equal(t, "HIT", a.get(t, "/products?a=1&b=2", "Accept-Language", "fr").header.Get("X-Cache"))
		require.Equal(t, "MISS", a.get(t, "/products/{7}").header.Get("X-Cache"), "hostile paths are keys like any other")
		require.Equal(t, "HIT", a.get(t, "/products/{7}").header.Get("X-Cache"))
	})
}

func TestCacheMiddlewareWhatIsNotCached(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheApp(t, r, r.Client(), func(c *CacheConfig) { c.MaxBodySize = 1024 })
		tests := []struct {
			name    string
			path    string
			headers []string
		}{
			{name: "5xx", path: "/status/500"},
			{name: "503", path: "/status/503"},
			{name: "404 without NotFoundTTL", path: "/products/404"},
			{name: "201 not in Statuses", path: "/status/201"},
			{name: "no-store", path: "/nostore"},
			{name: "private", path: "/private"},
			{name: "Set-Cookie", path: "/cookie"},
			{name: "Vary: *", path: "/vary-star"},
			{name: "too big", path: "/big"},
			{name: "handler error", path: "/error"},
			{name: "streamed", path: "/stream"},
			{name: "Authorization", path: "/products?auth", headers: []string{"Authorization", "Bearer x"}},
			{name: "session cookie", path: "/products?sess", headers: []string{"Cookie", "sessionId=abc"}},
			{name: "request no-store", path: "/products?ns", headers: []string{"Cache-Control", "no-store"}},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				p := strings.SplitN(tt.path, "?", 2)[0]
				before := a.count(routeOf(p))
				r1 := a.get(t, tt.path, tt.headers...)
				r2 := a.get(t, tt.path, tt.headers...)
				require.Equal(t, r1.code, r2.code)
				require.Equal(t, r1.body, r2.body)
				require.NotEqual(t, "HIT", r2.header.Get("X-Cache"))
				require.Equal(t, before+2, a.count(routeOf(p)), "the handler ran both times")
			})
		}
		require.Equal(t, "ab", a.get(t, "/stream").body, "a streamed response passes through whole")
		require.Equal(t, http.StatusTeapot, a.get(t, "/error").code, "Echo's error handler still answers")
	})
}

// routeOf maps a request path to its route, for the call counters.
func routeOf(path string) string {
	switch {
	case strings.HasPrefix(path, "/products/"):
		return "/products/:id"
	case strings.HasPrefix(path, "/status/"):
		return "/status/:code"
	}
	return path
}

func TestCacheMiddlewareNegativeCachingAndStatuses(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheApp(t, r, r.Client(), func(c *CacheConfig) {
			c.NotFoundTTL = 10 * time.Second
			c.Statuses = []int{200, 201}
		})
		require.Equal(t, http.StatusNotFound, a.get(t, "/products/404").code)
		rep := a.get(t, "/products/404")
		require.Equal(t, http.StatusNotFound, rep.code)
		require.Equal(t, "HIT", rep.header.Get("X-Cache"))
		require.Equal(t, int32(1), a.count("/products/:id"))
		a.get(t, "/status/201")
		require.Equal(t, "HIT", a.get(t, "/status/201").header.Get("X-Cache"))

		_, err := CacheConfig{Client: r.Client(), Statuses: []int{500}}.ToMiddleware()
		require.ErrorIs(t, err, ErrInvalidCacheConfig, "5xx can never be cached")
	})
}

func TestCacheMiddlewareConditionalRequests(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheApp(t, r, r.Client(), nil)
		// On a miss: the computed ETag is known before the body goes out.
		miss := a.get(t, "/products/1")
		etag := miss.header.Get("ETag")
		require.True(t, strings.HasPrefix(etag, `"`), "a strong ETag: %s", etag)
		// Another key with the same body: a miss that answers 304.
		rep := a.get(t, "/products/1?fresh=1", "If-None-Match", etag)
		require.Equal(t, http.StatusNotModified, rep.code)
		require.Equal(t, "MISS", rep.header.Get("X-Cache"))
		require.Empty(t, rep.body)
		// On a hit.
		rep = a.get(t, "/products/1", "If-None-Match", `"other", `+etag)
		require.Equal(t, http.StatusNotModified, rep.code)
		require.Equal(t, "HIT", rep.header.Get("X-Cache"))
		require.Empty(t, rep.body)
		require.Equal(t, http.StatusOK, a.get(t, "/products/1", "If-None-Match", `"other"`).code)
		// The handler's own ETag is kept.
		a.get(t, "/etag")
		rep = a.get(t, "/etag", "If-None-Match", `W/"v1"`)
		require.Equal(t, http.StatusNotModified, rep.code)
		require.Equal(t, `"v1"`, rep.header.Get("ETag"))
	})
}

func TestCacheMiddlewareCustomKeyAndPersonal(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheApp(t, r, r.Client(), func(c *CacheConfig) {
			c.Personal = true
			c.KeyFunc = func(c echo.Context) string {
				if c.Param("id") == "" {
					return ""
				}
				return "user:" + c.Param("id")
			}
		})
		a.get(t, "/products/1", "Authorization", "Bearer a")
		rep := a.get(t, "/products/1", "Authorization", "Bearer b")
		require.Equal(t, "HIT", rep.header.Get("X-Cache"), "a personal route caches by its own key")
		var v map[string]string
		ok, err := a.store.Get(context.Background(), "user:1", &v)
		require.NoError(t, err)
		require.True(t, ok, "the service reads the response's body: one storage format")
		require.Equal(t, map[string]string{"id": "1"}, v)
		require.NoError(t, a.store.Delete(context.Background(), "user:1"))
		require.Equal(t, "MISS", a.get(t, "/products/1").header.Get("X-Cache"), "deleted through the service")
		require.NotEqual(t, "HIT", a.get(t, "/products").header.Get("X-Cache"), `an empty key bypasses the cache`)
	})
}

// TestCacheMiddlewareStampede: 100 concurrent misses spread over two
// instances, each with its own client, run the handler exactly once.
func TestCacheMiddlewareStampede(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		apps := []*cacheApp{newCacheApp(t, r, r.Client(), nil), newCacheApp(t, r, r.Client(), nil)}
		var wg sync.WaitGroup
		var hits atomic.Int32
		for i := range 100 {
			wg.Go(func() {
				rep := apps[i%2].get(t, "/slow")
				assert.Equal(t, http.StatusOK, rep.code)
				assert.Equal(t, "slow", rep.body)
				if rep.header.Get("X-Cache") == "HIT" {
					hits.Add(1)
				}
			})
		}
		wg.Wait()
		require.Equal(t, int32(1), apps[0].count("/slow")+apps[1].count("/slow"), "the handler ran once for 100 concurrent misses")
		require.Equal(t, int32(99), hits.Load())
	})
}

func TestCacheMiddlewareTagsAndServiceShareStorage(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheApp(t, r, r.Client(), func(c *CacheConfig) {
			c.Tags = func(c echo.Context) []string {
				if id := c.Param("id"); id != "" {
					return []string{"products", "product:" + id}
				}
				return []string{"products"}
			}
		})
		a.get(t, "/products")
		a.get(t, "/products/7")
		a.get(t, "/products/8")
		for _, p := range []string{"/products", "/products/7", "/products/8"} {
			require.Equal(t, "HIT", a.get(t, p).header.Get("X-Cache"), p)
		}
		// Updating product 7 invalidates its page and the list.
		require.NoError(t, a.store.InvalidateTags(context.Background(), "product:7", "products"))
		require.Equal(t, "MISS", a.get(t, "/products/7").header.Get("X-Cache"))
		require.Equal(t, "MISS", a.get(t, "/products").header.Get("X-Cache"))
		require.Equal(t, "MISS", a.get(t, "/products/8").header.Get("X-Cache"), "tagged products too")
		require.NoError(t, a.store.InvalidateTags(context.Background(), "product:7"))
		require.Equal(t, "HIT", a.get(t, "/products/8").header.Get("X-Cache"), "product 8 is not product 7")
	})
}

func TestCacheMiddlewareStaleWhileRevalidate(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		clock := newFakeClock()
		store := newCacheStore(t, r, r.Client(), func(c *CacheStoreConfig) { c.Clock = clock })
		var version atomic.Int32
		var panicky atomic.Bool
		e := echo.New()
		e.Use(CacheWithConfig(CacheConfig{Store: store, TTL: time.Minute, StaleWhileRevalidate: time.Hour}))
		e.GET("/v", func(c echo.Context) error {
			if panicky.Load() {
				panic("refresh blew up")
			}
			return c.String(http.StatusOK, fmt.Sprint(version.Add(1)))
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		a := &cacheApp{store: store, srv: srv}
		require.Equal(t, "1", a.get(t, "/v").body)
		clock.Advance(2 * time.Minute)
		panicky.Store(true)
		rep := a.get(t, "/v")
		require.Equal(t, "1", rep.body, "stale served")
		require.Equal(t, "HIT", rep.header.Get("X-Cache"))
		require.Equal(t, "120", rep.header.Get("Age"), "its Age tells it is stale")
		time.Sleep(100 * time.Millisecond) // the background refresh panics: logged, not fatal
		panicky.Store(false)
		require.Eventually(t, func() bool { return a.get(t, "/v").body == "2" }, 5*time.Second, 20*time.Millisecond,
			"one background refresh replaced the stale entry")
		require.Equal(t, int32(2), version.Load(), "refreshed once")
	})
}

// TestCacheRedisDownPassThrough: with Redis stopped or the breaker open,
// every request still succeeds, uncached.
func TestCacheRedisDownPassThrough(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		br := NewBreaker(BreakerConfig{Failures: 3, Cooldown: time.Hour, Logger: discardLogger()})
		store, err := NewCacheStore(CacheStoreConfig{Client: f.Client(), Options: Options{Prefix: f.Keys.Prefix(), Timeout: time.Second, Breaker: br, Logger: discardLogger()}})
		require.NoError(t, err)
		var calls atomic.Int32
		e := echo.New()
		e.Use(CacheWithConfig(CacheConfig{Store: store}))
		e.GET("/p", func(c echo.Context) error {
			calls.Add(1)
			return c.String(http.StatusOK, "fresh")
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		a := &cacheApp{store: store, srv: srv}
		a.get(t, "/p")
		require.Equal(t, "HIT", a.get(t, "/p").header.Get("X-Cache"))

		f.Stop(t)
		for i := range 20 {
			rep := a.get(t, fmt.Sprint("/p?i=", i))
			require.Equal(t, http.StatusOK, rep.code)
			require.Equal(t, "fresh", rep.body)
		}
		require.True(t, br.AnyOpen(), "the breaker opened, so a failing Redis is not hammered")
		start := time.Now()
		rep := a.get(t, "/p?again")
		require.Equal(t, http.StatusOK, rep.code)
		require.Less(t, time.Since(start), 500*time.Millisecond, "with the breaker open, no Redis wait (the deadline is 1 s)")
		_, err = Remember(context.Background(), store, "k", time.Minute, func(context.Context) (int, error) { return 1, nil })
		require.NoError(t, err, "Remember computes uncached")
	})
}

func TestCacheTagCountersExpire(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		cs := newCacheStore(t, r, c, func(cfg *CacheStoreConfig) { cfg.TagTTL = time.Hour })
		ctx := ctx5s(t)
		require.NoError(t, cs.InvalidateTags(ctx, "t"))
		ttl, err := c.Do(ctx, c.B().Pttl().Key(cs.tagKey("t")).Build()).AsInt64()
		require.NoError(t, err)
		require.InDelta(t, time.Hour.Milliseconds(), ttl, 5000, "tag counters do not pile up")
		require.NoError(t, cs.Set(ctx, "k", 1, 48*time.Hour, "t"))
		ttl, err = c.Do(ctx, c.B().Pttl().Key(cs.entryKey("k")).Build()).AsInt64()
		require.NoError(t, err)
		require.LessOrEqual(t, ttl, time.Hour.Milliseconds(), "a tagged entry never outlives its tag's counter")
	})
}

// TestCacheInvalidationWindow measures how long another instance keeps
// serving an entry after a tag invalidation elsewhere. The README reports
// the figures; the test only requires that the invalidation arrives.
func TestCacheInvalidationWindow(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheStore(t, r, r.Client(), nil)
		b := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		var windows []time.Duration
		for i := range 100 {
			v := fmt.Sprint(i)
			get := func() string {
				got, err := Remember(ctx, a, fmt.Sprint("w", i), time.Minute, func(context.Context) (string, error) { return v, nil }, WithTags("w"))
				require.NoError(t, err)
				return got
			}
			require.Equal(t, v, get())
			require.Equal(t, v, get()) // now in a's local cache
			v = fmt.Sprint(i, "'")
			require.NoError(t, b.InvalidateTags(ctx, "w"))
			start := time.Now()
			for get() != v {
				require.Less(t, time.Since(start), 5*time.Second, "the invalidation never arrived")
			}
			windows = append(windows, time.Since(start))
		}
		slices.Sort(windows)
		t.Logf("%s: after an invalidation elsewhere, an instance serves the old entry for p50 %v, p99 %v, max %v (100 trials)",
			r.Topology, windows[49], windows[98], windows[99])
	})
}

func TestCacheConfigValidation(t *testing.T) {
	c := standaloneClient(t)
	tests := []struct {
		name    string
		given   CacheConfig
		wantErr error
	}{
		{name: "no client", given: CacheConfig{}, wantErr: ErrNilClient},
		{name: "negative TTL", given: CacheConfig{Client: c, TTL: -1}, wantErr: ErrInvalidCacheConfig},
		{name: "negative grace", given: CacheConfig{Client: c, StaleWhileRevalidate: -1}, wantErr: ErrInvalidCacheConfig},
		{name: "5xx status", given: CacheConfig{Client: c, Statuses: []int{200, 502}}, wantErr: ErrInvalidCacheConfig},
		{name: "brace in prefix", given: CacheConfig{Client: c, Options: Options{Prefix: "{p}"}}, wantErr: ErrInvalidPrefix},
		{name: "defaults", given: CacheConfig{Client: c}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.given.ToMiddleware()
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				require.Panics(t, func() { CacheWithConfig(tt.given) })
				return
			}
			require.NoError(t, err)
			require.NotPanics(t, func() { Cache(c, time.Minute) })
		})
	}
	_, err := NewCacheStore(CacheStoreConfig{Client: c, LockTTL: -1})
	require.ErrorIs(t, err, ErrInvalidCacheConfig)
}

func TestGetCacheWithoutMiddleware(t *testing.T) {
	e := echo.New()
	c := e.NewContext(httptest.NewRequest(http.MethodGet, "/", nil), httptest.NewRecorder())
	cs, err := GetCache(c)
	require.Nil(t, cs)
	require.ErrorIs(t, err, ErrNoCacheMiddleware)
}

func TestDefaultCacheKey(t *testing.T) {
	e := echo.New()
	tests := []struct {
		name  string
		given string
		hdr   map[string]string
		want  string
	}{
		{name: "sorted query", given: "/p?b=2&a=1", want: "GET /p?a=1&b=2"},
		{name: "repeated values keep their order", given: "/p?a=2&a=1", want: "GET /p?a=2&a=1"},
		{name: "no query", given: "/p", want: "GET /p"},
		{name: "empty query", given: "/p?", want: "GET /p"},
		{name: "vary header", given: "/p", hdr: map[string]string{"Accept-Language": "fr"}, want: "GET /p\nAccept-Language:fr"},
		{name: "unlisted header ignored", given: "/p", hdr: map[string]string{"X-Other": "1"}, want: "GET /p"},
		{name: "escaped path", given: "/p/a%20b", want: "GET /p/a%20b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodGet, tt.given, nil)
			for k, v := range tt.hdr {
				req.Header.Set(k, v)
			}
			c := e.NewContext(req, httptest.NewRecorder())
			require.Equal(t, tt.want, DefaultCacheKey(c, []string{"Accept-Language"}))
		})
	}
}

func TestCacheMiddlewarePanickingHandler(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store := newCacheStore(t, r, r.Client(), nil)
		e := echo.New()
		e.Use(middleware.RecoverWithConfig(middleware.RecoverConfig{DisablePrintStack: true}), CacheWithConfig(CacheConfig{Store: store}))
		var calls atomic.Int32
		e.GET("/boom", func(c echo.Context) error {
			if calls.Add(1) == 1 {
				_ = c.String(http.StatusOK, "half")
				panic("boom")
			}
			return c.String(http.StatusOK, "fine")
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		a := &cacheApp{store: store, srv: srv}
		rep := a.get(t, "/boom")
		require.Equal(t, http.StatusInternalServerError, rep.code, "the recovering middleware answers")
		rep = a.get(t, "/boom")
		require.Equal(t, "fine", rep.body, "nothing from the panicking run was cached, and no waiter is stuck")
		require.Equal(t, "MISS", rep.header.Get("X-Cache"))
	})
}

func TestCacheMiddlewarePanicReleasesTheFillLock(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store := newCacheStore(t, r, r.Client(), nil)
		e := echo.New()
		e.Use(middleware.RecoverWithConfig(middleware.RecoverConfig{DisablePrintStack: true}), CacheWithConfig(CacheConfig{Store: store}))
		var calls atomic.Int32
		e.GET("/boom", func(c echo.Context) error {
			if calls.Add(1) == 1 {
				panic("boom")
			}
			return c.String(http.StatusOK, "fine")
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		a := &cacheApp{store: store, srv: srv}
		require.Equal(t, http.StatusInternalServerError, a.get(t, "/boom").code)
		start := time.Now()
		require.Equal(t, "fine", a.get(t, "/boom").body)
		require.Less(t, time.Since(start), DefaultCacheLockTTL/2, "the next request did not wait for the dead fill's lock")
	})
}

// TestRememberStampedeNoRefill: concurrent misses over two instances run
// the function once even when it is instant (the lock holder re-reads the
// entry before it fills).
func TestRememberStampedeNoRefill(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		stores := []*CacheStore{newCacheStore(t, r, r.Client(), nil), newCacheStore(t, r, r.Client(), nil)}
		ctx := ctx5s(t)
		for round := range 100 {
			key := fmt.Sprint("fast", round)
			var calls atomic.Int32
			var wg sync.WaitGroup
			for i := range 4 {
				wg.Go(func() {
					v, err := Remember(ctx, stores[i%2], key, time.Minute, func(context.Context) (int, error) {
						calls.Add(1)
						return 1, nil
					})
					assert.NoError(t, err)
					assert.Equal(t, 1, v)
				})
			}
			wg.Wait()
			require.Equal(t, int32(1), calls.Load(), "round %d", round)
		}
	})
}

// TestCacheInvalidationBeatsAJoinedFill: a request that comes after an
// invalidation does not get the result of a fill that began before it.
func TestCacheInvalidationBeatsAJoinedFill(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		started, release := make(chan struct{}), make(chan struct{})
		go func() {
			_, _ = Remember(ctx, cs, "p", time.Minute, func(context.Context) (string, error) {
				close(started)
				<-release
				return "v1", nil
			}, WithTags("t"))
		}()
		<-started
		require.NoError(t, cs.InvalidateTags(ctx, "t"))
		time.AfterFunc(100*time.Millisecond, func() { close(release) }) // the old fill ends meanwhile
		v, err := Remember(ctx, cs, "p", time.Minute, func(context.Context) (string, error) { return "v2", nil }, WithTags("t"))
		require.NoError(t, err)
		require.Equal(t, "v2", v, "the request after the invalidation got the old fill's value")
	})
}

// TestCacheDeleteBeatsAFillInFlight: a fill that read the data before a
// Delete stores nothing.
func TestCacheDeleteBeatsAFillInFlight(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		other := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		finish := fillInFlight(ctx, cs, "p", "v1")
		require.NoError(t, other.Delete(ctx, "p"))
		require.NoError(t, finish())
		var v string
		for _, st := range []*CacheStore{cs, other} {
			ok, err := st.Get(ctx, "p", &v)
			require.NoError(t, err)
			require.False(t, ok, "the value read before the delete was stored")
		}
	})
}

// TestCacheTagFloorsExpire: this instance's memory of its own invalidations
// expires, so it agrees with Redis once a tag counter has expired.
func TestCacheTagFloorsExpire(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), func(c *CacheStoreConfig) {
			c.TagTTL = 300 * time.Millisecond
			c.RecentWindow = 100 * time.Millisecond
		})
		ctx := ctx5s(t)
		require.NoError(t, cs.InvalidateTags(ctx, "t"))
		time.Sleep(500 * time.Millisecond) // the counter expired
		var calls atomic.Int32
		for range 5 {
			_, err := Remember(ctx, cs, "k", time.Minute, func(context.Context) (int, error) { calls.Add(1); return 1, nil }, WithTags("t"))
			require.NoError(t, err)
		}
		require.Equal(t, int32(1), calls.Load())
	})
}

func TestCacheMiddlewareStreamsAndUpgrades(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store := newCacheStore(t, r, r.Client(), nil)
		e := echo.New()
		e.Use(CacheWithConfig(CacheConfig{Store: store, NotFoundTTL: 0}))
		e.GET("/sse", func(c echo.Context) error {
			c.Response().Header().Set("Content-Type", "text/event-stream")
			c.Response().WriteHeader(http.StatusOK)
			for i := range 5 {
				fmt.Fprintf(c.Response(), "data: %d\n\n", i)
				c.Response().Flush()
				time.Sleep(100 * time.Millisecond)
			}
			return nil
		})
		e.GET("/ws", func(c echo.Context) error {
			conn, rw, err := http.NewResponseController(c.Response()).Hijack()
			if err != nil {
				return err
			}
			defer conn.Close()
			_, _ = rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
			return rw.Flush()
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		a := &cacheApp{store: store, srv: srv}

		// A long stream does not hold up the next client of the same URL.
		go a.get(t, "/sse")
		time.Sleep(50 * time.Millisecond)
		start := time.Now()
		resp, err := http.Get(srv.URL + "/sse")
		require.NoError(t, err)
		buf := make([]byte, 8)
		_, err = io.ReadFull(resp.Body, buf)
		require.NoError(t, err)
		resp.Body.Close()
		require.Less(t, time.Since(start), 300*time.Millisecond, "the second stream started at once")

		// A hijacked connection gets exactly what the handler wrote.
		for _, hdr := range []string{"", "websocket"} {
			conn, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
			require.NoError(t, err)
			req := "GET /ws HTTP/1.1\r\nHost: x\r\n"
			if hdr != "" {
				req += "Upgrade: " + hdr + "\r\nConnection: Upgrade\r\n"
			}
			_, _ = io.WriteString(conn, req+"\r\n")
			line, err := bufio.NewReader(conn).ReadString('\n')
			require.NoError(t, err)
			require.Equal(t, "HTTP/1.1 101 Switching Protocols\r\n", line)
			conn.Close()
		}
	})
}

// TestCacheUncacheableResponsesDoNotStallOthers: when the filler's response
// cannot be stored, another instance waiting for it goes on at once.
func TestCacheUncacheableResponsesDoNotStallOthers(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		apps := []*cacheApp{newCacheApp(t, r, r.Client(), nil), newCacheApp(t, r, r.Client(), nil)}
		var wg sync.WaitGroup
		start := time.Now()
		for i := range 10 {
			wg.Go(func() {
				assert.Equal(t, http.StatusNotFound, apps[i%2].get(t, "/products/404").code)
			})
		}
		wg.Wait()
		require.Less(t, time.Since(start), DefaultCacheLockTTL/2, "nobody waited out the lock")
	})
}

func TestCacheMiddlewareReplaysVary(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store := newCacheStore(t, r, r.Client(), nil)
		e := echo.New()
		e.Use(CacheWithConfig(CacheConfig{Store: store}))
		e.GET("/v", func(c echo.Context) error {
			c.Response().Header().Set("Vary", "Accept-Language")
			return c.String(http.StatusOK, c.Request().Header.Get("Accept-Language"))
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		a := &cacheApp{store: store, srv: srv}
		a.get(t, "/v", "Accept-Language", "fr")
		rep := a.get(t, "/v", "Accept-Language", "fr")
		require.Equal(t, "HIT", rep.header.Get("X-Cache"))
		require.Equal(t, "Accept-Language", rep.header.Get("Vary"), "downstream caches must keep the variants apart")
		require.Equal(t, "en", a.get(t, "/v", "Accept-Language", "en").body)
	})
}

func TestCachePersonalNeedsAKey(t *testing.T) {
	c := standaloneClient(t)
	_, err := CacheConfig{Client: c, Personal: true}.ToMiddleware()
	require.ErrorIs(t, err, ErrInvalidCacheConfig)
	_, err = CacheConfig{Client: c, Personal: true, KeyFunc: func(echo.Context) string { return "k" }, StaleWhileRevalidate: time.Second}.ToMiddleware()
	require.ErrorIs(t, err, ErrInvalidCacheConfig)
}

// TestCacheFillWithoutTheLockStoresNothing: a fill that gave up waiting for
// another instance's lock computes uncached and stores nothing, so a Delete
// during it holds.
func TestCacheFillWithoutTheLockStoresNothing(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		cs := newCacheStore(t, r, c, func(cfg *CacheStoreConfig) { cfg.LockTTL = 300 * time.Millisecond })
		ctx := ctx5s(t)
		require.NoError(t, c.Do(ctx, c.B().Set().Key(cs.lockKey("k")).Value("someone-else").Px(time.Minute).Build()).Error())
		v, err := Remember(ctx, cs, "k", time.Minute, func(context.Context) (string, error) { return "old", nil })
		require.NoError(t, err)
		require.Equal(t, "old", v)
		var got string
		ok, err := cs.Get(ctx, "k", &got)
		require.NoError(t, err)
		require.False(t, ok, "computed without the lock: not stored")
	})
}

// TestCacheSetBeatsAnOlderFill: Set removes the fill lock, so a fill that
// began before it cannot overwrite it.
func TestCacheSetBeatsAnOlderFill(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		finish := fillInFlight(ctx, cs, "k", "old")
		require.NoError(t, cs.Set(ctx, "k", "new", time.Minute))
		require.NoError(t, finish())
		var got string
		ok, err := cs.Get(ctx, "k", &got)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, "new", got)
	})
}

// TestRememberFailingFunctionRunsOnce: concurrent callers share one failing
// call; the backend is not hit once per caller.
func TestRememberFailingFunctionRunsOnce(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		boom := errors.New("database down")
		var calls atomic.Int32
		gate := make(chan struct{})
		var wg sync.WaitGroup
		for range 20 {
			wg.Go(func() {
				_, err := Remember(ctx, cs, "k", time.Minute, func(context.Context) (int, error) {
					calls.Add(1)
					<-gate
					return 0, boom
				})
				assert.ErrorIs(t, err, boom)
			})
		}
		time.Sleep(100 * time.Millisecond)
		close(gate)
		wg.Wait()
		require.Equal(t, int32(1), calls.Load())
	})
}

// TestCachePanicWhileUncachedLeavesNoBlock: a panic in a fill that runs
// uncached (Redis failed) does not leave the key blocked for LockTTL.
func TestCachePanicWhileUncachedLeavesNoBlock(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		cs := newCacheStore(t, r, c, func(cfg *CacheStoreConfig) { cfg.LockTTL = 2 * time.Second })
		ctx := ctx5s(t)
		// A tag key of the wrong type makes the tag read fail, as a Redis
		// failure would.
		require.NoError(t, c.Do(ctx, c.B().Lpush().Key(cs.tagKey("t")).Element("x").Build()).Error())
		require.Panics(t, func() {
			_, _ = Remember(ctx, cs, "k", time.Minute, func(context.Context) (int, error) { panic("boom") }, WithTags("t"))
		})
		start := time.Now()
		v, err := Remember(ctx, cs, "k", time.Minute, func(context.Context) (int, error) { return 1, nil }, WithTags("t"))
		require.NoError(t, err)
		require.Equal(t, 1, v)
		require.Less(t, time.Since(start), time.Second, "the key was not left blocked")
	})
}

// TestCacheServiceValueUnderAResponseKey: a service value stored under a key
// a route also uses is not replayed as a response.
func TestCacheServiceValueUnderAResponseKey(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheApp(t, r, r.Client(), func(c *CacheConfig) {
			c.KeyFunc = func(c echo.Context) string { return "user:" + c.Param("id") }
		})
		require.NoError(t, a.store.Set(context.Background(), "user:5", map[string]int{"id": 5}, time.Minute))
		rep := a.get(t, "/products/5")
		require.Equal(t, http.StatusOK, rep.code)
		require.JSONEq(t, `{"id":"5"}`, rep.body, "the handler answered")
	})
}

// TestCacheDeadlinesDoNotDisableCaching: a handler that sets a write
// deadline through http.ResponseController is still cached.
func TestCacheDeadlinesDoNotDisableCaching(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store := newCacheStore(t, r, r.Client(), nil)
		e := echo.New()
		e.Use(CacheWithConfig(CacheConfig{Store: store}))
		var calls atomic.Int32
		e.GET("/d", func(c echo.Context) error {
			calls.Add(1)
			_ = http.NewResponseController(c.Response()).SetWriteDeadline(time.Now().Add(time.Minute))
			return c.String(http.StatusOK, "ok")
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		a := &cacheApp{store: store, srv: srv}
		for range 3 {
			require.Equal(t, "ok", a.get(t, "/d").body)
		}
		require.Equal(t, int32(1), calls.Load())
	})
}

func TestCacheMiddlewareHeadAndOtherMethods(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		store := newCacheStore(t, r, r.Client(), nil)
		e := echo.New()
		e.Use(CacheWithConfig(CacheConfig{Store: store}))
		var calls atomic.Int32
		h := func(c echo.Context) error {
			calls.Add(1)
			return c.String(http.StatusOK, "body")
		}
		e.Match([]string{http.MethodGet, http.MethodHead, http.MethodPost}, "/m", h)
		srv := httptest.NewServer(e)
		defer srv.Close()
		do := func(method string) (*http.Response, string) {
			req, _ := http.NewRequest(method, srv.URL+"/m", nil)
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return resp, string(b)
		}
		resp, body := do(http.MethodHead)
		require.Equal(t, "MISS", resp.Header.Get("X-Cache"))
		require.Empty(t, body)
		resp, body = do(http.MethodHead)
		require.Equal(t, "HIT", resp.Header.Get("X-Cache"), "HEAD is cached")
		require.Empty(t, body, "and answers no body")
		_, body = do(http.MethodGet)
		require.Equal(t, "body", body, "GET is its own entry")
		before := calls.Load()
		for range 2 {
			resp, body = do(http.MethodPost)
			require.Equal(t, "body", body)
			require.Empty(t, resp.Header.Get("X-Cache"), "POST is never cached")
		}
		require.Equal(t, before+2, calls.Load())
	})
}

// hostileApp is an instance whose routes take their keys and tags from
// whatever the client sends.
type hostileApp struct {
	store *CacheStore
	srv   *httptest.Server
	calls atomic.Int32
}

func newHostileApp(t *testing.T, r *testRedis, client rueidis.Client, mod func(*CacheConfig)) *hostileApp {
	t.Helper()
	a := &hostileApp{store: newCacheStore(t, r, client, nil)}
	cfg := CacheConfig{Store: a.store, TTL: time.Minute, NotFoundTTL: time.Minute,
		Tags: func(c echo.Context) []string {
			if id := c.Param("id"); id != "" {
				return []string{"product:" + id}
			}
			return nil
		}}
	if mod != nil {
		mod(&cfg)
	}
	e := echo.New()
	g := e.Group("", CacheWithConfig(cfg))
	answer := func(c echo.Context) error {
		a.calls.Add(1)
		return c.JSON(http.StatusOK, map[string]int{"path": len(c.Request().URL.Path), "query": len(c.Request().URL.RawQuery), "accept": len(c.Request().Header.Get("Accept"))})
	}
	g.GET("/products/:id", answer)
	g.GET("/q", answer)
	srv := httptest.NewUnstartedServer(e)
	srv.Config.MaxHeaderBytes = 8 << 20
	srv.Start()
	t.Cleanup(srv.Close)
	a.srv = srv
	return a
}

func (a *hostileApp) get(t *testing.T, path string, headers ...string) reply {
	t.Helper()
	return (&cacheApp{srv: a.srv}).get(t, path, headers...)
}

// cacheKeySizes returns, for every key under r's prefix, its length and
// MEMORY USAGE (key, value and overhead).
func cacheKeySizes(t *testing.T, r *testRedis, client rueidis.Client) map[string][2]int64 {
	t.Helper()
	out := map[string][2]int64{}
	err := scanMasters(ctx5s(t), client, matchPattern(r.Keys.Prefix()), func(ctx context.Context, n rueidis.Client, keys []string) error {
		for _, k := range keys {
			mem, err := n.Do(ctx, n.B().MemoryUsage().Key(k).Build()).AsInt64()
			if err != nil && !rueidis.IsRedisNil(err) {
				return err
			}
			out[k] = [2]int64{int64(len(k)), mem}
		}
		return nil
	})
	require.NoError(t, err)
	return out
}

// TestCacheKeysAreBoundedWhateverTheRequest: a 1 MB path, query, Vary
// header value or tag makes keys of bounded length and entries of the
// response's size, and the cache still works on them: hits, tag
// invalidation, Flush by the readable head.
func TestCacheKeysAreBoundedWhateverTheRequest(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		a := newHostileApp(t, r, client, nil)
		mb := strings.Repeat("a", 1<<20)
		tests := []struct {
			name    string
			path    string
			headers []string
			want    string
		}{
			{name: "1 MB path (and tag)", path: "/products/" + mb, want: fmt.Sprintf(`{"accept":0,"path":%d,"query":0}`, len("/products/")+len(mb))},
			{name: "1 MB query", path: "/q?x=" + mb, want: fmt.Sprintf(`{"accept":0,"path":2,"query":%d}`, len(mb)+2)},
			{name: "1 MB Accept (a Vary header)", path: "/q", headers: []string{"Accept", mb}, want: fmt.Sprintf(`{"accept":%d,"path":2,"query":0}`, len(mb))},
			{name: "1 MB of key syntax", path: "/products/" + url.PathEscape(strings.Repeat("{:%}", 1<<18)), want: fmt.Sprintf(`{"accept":0,"path":%d,"query":0}`, len("/products/")+1<<20)},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				first := a.get(t, tt.path, tt.headers...)
				require.Equal(t, http.StatusOK, first.code)
				require.Equal(t, "MISS", first.header.Get("X-Cache"))
				require.JSONEq(t, tt.want, first.body)
				for range 3 {
					rep := a.get(t, tt.path, tt.headers...)
					require.Equal(t, "HIT", rep.header.Get("X-Cache"))
					require.JSONEq(t, tt.want, rep.body)
				}
			})
		}
		// Every key the cache wrote is short, and so is every value.
		sizes := cacheKeySizes(t, r, client)
		require.GreaterOrEqual(t, len(sizes), 4+2, "4 entries, 2 tag counters")
		maxLen := int64(len(r.Keys.Prefix()) + 262)
		for k, s := range sizes {
			require.LessOrEqual(t, s[0], maxLen, "key %.80q", k)
			require.Less(t, s[1], int64(2048), "MEMORY USAGE of %.80q", k)
			if strings.Contains(k, "%~") {
				require.LessOrEqual(t, s[0], int64(len(r.Keys.Prefix())+len("{c:")+KeptPartHead+len("%~")+43+len("}:e")), "a digested key keeps a 64-byte head: %.80q", k)
			}
		}
		// Nor does the process keep the long keys.
		a.store.keyMemo.Range(func(k, _ any) bool {
			if s, ok := k.(string); ok {
				require.LessOrEqual(t, len(s), MaxKeyPart)
			}
			return true
		})

		ctx := ctx5s(t)
		require.NoError(t, a.store.InvalidateTags(ctx, "product:"+mb))
		require.Equal(t, "MISS", a.get(t, "/products/"+mb).header.Get("X-Cache"), "a 1 MB tag invalidates")
		require.Equal(t, "HIT", a.get(t, "/products/"+mb).header.Get("X-Cache"))
		n, err := a.store.Flush(ctx, "GET /products/aaaa*")
		require.NoError(t, err)
		require.Equal(t, 1, n, "a Flush pattern matches a digested key by its readable head")
		require.Equal(t, "MISS", a.get(t, "/products/"+mb).header.Get("X-Cache"))
		n, err = a.store.Flush(ctx, "GET /products/"+mb)
		require.NoError(t, err)
		require.Zero(t, n, "a literal pattern past the head matches no digested key (documented)")

		// The cache service: a 1 MB key and tag.
		require.NoError(t, a.store.Set(ctx, mb, "v", time.Minute, mb))
		var v string
		ok, err := a.store.Get(ctx, mb, &v)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, "v", v)
		require.NoError(t, a.store.InvalidateTags(ctx, mb))
		ok, err = a.store.Get(ctx, mb, &v)
		require.NoError(t, err)
		require.False(t, ok, "invalidated through its 1 MB tag")
		for k, s := range cacheKeySizes(t, r, client) {
			require.LessOrEqual(t, s[0], maxLen, "key %.80q", k)
			require.Less(t, s[1], int64(2048), "MEMORY USAGE of %.80q", k)
		}
	})
}

// commandCalls sums INFO commandstats calls over addrs, leaving out the
// commands that the harness, rueidis's keep-alive and the breaker's slot
// map send on their own.
func commandCalls(t *testing.T, addrs []string) int64 {
	t.Helper()
	var n int64
	for _, a := range addrs {
		for k, v := range infoFields(t, a, "commandstats") {
			name := strings.TrimPrefix(k, "cmdstat_")
			if name == "info" || name == "ping" || strings.HasPrefix(name, "cluster") || strings.HasPrefix(name, "client") || name == "hello" || strings.HasPrefix(name, "command") {
				continue
			}
			calls, _, _ := strings.Cut(strings.TrimPrefix(v, "calls="), ",")
			c, err := strconv.ParseInt(calls, 10, 64)
			require.NoError(t, err, "%s=%s", k, v)
			n += c
		}
	}
	return n
}

// TestCacheWarmHitSendsNothing: once an instance has served an entry, its
// hits (tags validated too) send no command to Redis.
func TestCacheWarmHitSendsNothing(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		client := f.Client()
		a := newHostileApp(t, f.testRedis, client, nil)
		addrs := masterAddrs(t, client)
		for _, path := range []string{"/q?warm", "/products/7"} {
			require.Equal(t, "MISS", a.get(t, path).header.Get("X-Cache"))
			// The first hits find the entry untracked, then track it.
			require.Equal(t, "HIT", a.get(t, path).header.Get("X-Cache"))
			require.Equal(t, "HIT", a.get(t, path).header.Get("X-Cache"))
		}
		// Many other keys since (the key memo is emptied when full) do not
		// make the hot entries forget that they exist.
		for i := range 3 * maxDecoded {
			a.store.entry(fmt.Sprint("GET /other/", i))
		}
		before := commandCalls(t, addrs)
		for range 100 {
			for _, path := range []string{"/q?warm", "/products/7"} {
				require.Equal(t, "HIT", a.get(t, path).header.Get("X-Cache"))
			}
		}
		require.Equal(t, before, commandCalls(t, addrs), "200 warm hits sent commands to Redis")
		require.Equal(t, int32(2), a.calls.Load())
	})
}

// TestCacheMissPathsLeaveNoTrackingState: whatever path a request for a
// key that is never stored takes (an uncacheable response, a failing
// Remember, a Get of nothing, waiting for another instance's fill that
// stores nothing), Redis's tracking table is left as it was.
func TestCacheMissPathsLeaveNoTrackingState(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		ca, cb := f.Client(), f.Client()
		addrs := masterAddrs(t, ca)
		a := newCacheStore(t, f.testRedis, ca, nil)
		b := newCacheStore(t, f.testRedis, cb, nil)
		ctx := ctx5s(t)
		e := echo.New()
		e.Use(CacheWithConfig(CacheConfig{Store: a, Tags: func(c echo.Context) []string { return []string{"t:" + c.Param("id")} }}))
		e.GET("/x/:id", func(c echo.Context) error {
			switch c.Param("id")[0] {
			case 'p':
				c.Response().Header().Set("Cache-Control", "private")
			case 'e':
				return c.String(http.StatusInternalServerError, "boom")
			}
			return c.String(http.StatusNotFound, "none") // 404s are not cached here
		})
		srv := httptest.NewServer(e)
		t.Cleanup(srv.Close)
		app := &cacheApp{srv: srv}
		// Both clients made their one-time client-side caching check (a
		// tracked read of one fixed key).
		for _, st := range []*CacheStore{a, b} {
			require.NoError(t, st.Set(ctx, "warm", 1, time.Minute))
		}
		time.Sleep(100 * time.Millisecond)
		start := figures(t, addrs).tracking
		for i := range 50 {
			for _, id := range []string{"p", "e", "n"} {
				app.get(t, fmt.Sprint("/x/", id, i))
			}
			_, err := Remember(ctx, a, fmt.Sprint("fail", i), time.Minute, func(context.Context) (int, error) { return 0, errors.New("no") }, WithTags(fmt.Sprint("tf", i)))
			require.Error(t, err)
			var v int
			ok, err := a.Get(ctx, fmt.Sprint("nothing", i), &v)
			require.NoError(t, err)
			require.False(t, ok)
			// b waits for a's fill, which stores nothing.
			finish := make(chan struct{})
			started := make(chan struct{})
			go func() {
				_, _ = Remember(ctx, a, fmt.Sprint("shared", i), time.Minute, func(context.Context) (int, error) {
					close(started)
					<-finish
					return 0, errors.New("not storable")
				})
			}()
			<-started
			done := make(chan struct{})
			go func() {
				defer close(done)
				_, _ = Remember(ctx, b, fmt.Sprint("shared", i), time.Minute, func(context.Context) (int, error) { return 0, errors.New("no") })
			}()
			time.Sleep(20 * time.Millisecond) // b is waiting on a's lock
			close(finish)
			<-done
		}
		require.Equal(t, start, figures(t, addrs).tracking, "tracked reads of keys never written")
	})
}

// TestCacheInAFullRedis: with maxmemory reached under noeviction, hits are
// served (from memory, and from Redis untracked), misses run the handler
// and answer without storing anything, Delete and Flush work, Set and tag
// invalidations fail with ErrCacheOutOfMemory, and nothing is written: no
// entry, no tag counter, no lock left behind. Once memory is back, misses
// store again.
func TestCacheInAFullRedis(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		ca, cb := f.Client(), f.Client()
		addrs := masterAddrs(t, ca)
		a := newHostileApp(t, f.testRedis, ca, nil)
		b := newHostileApp(t, f.testRedis, cb, func(c *CacheConfig) {
			c.Store = nil
			c.Client = cb
			c.Options = Options{Prefix: f.Keys.Prefix(), Logger: discardLogger()}
		})
		ctx := ctx5s(t)
		// Before: /products/1 is hot in a's memory; a stored /products/2
		// but never read it back; b never read anything.
		for range 3 {
			a.get(t, "/products/1")
		}
		require.Equal(t, "HIT", a.get(t, "/products/1").header.Get("X-Cache"))
		require.Equal(t, "MISS", a.get(t, "/products/2").header.Get("X-Cache"))
		require.Equal(t, "MISS", a.get(t, "/q?flush=me").header.Get("X-Cache"))
		require.NoError(t, a.store.Set(ctx, "svc", "v", time.Minute))
		lockTok, err := a.store.tryLock(ctx, "direct")
		require.NoError(t, err)
		require.NotEmpty(t, lockTok)
		finish := fillInFlight(ctx, a.store, "inflight", "computed") // holds its fill lock through the OOM
		served := a.calls.Load()

		f.Fill(t)
		keys := figures(t, addrs).keys

		tests := []struct {
			name string
			app  *hostileApp
			path string
			want string // X-Cache
		}{
			{name: "hit from process memory", app: a, path: "/products/1", want: "HIT"},
			{name: "hit read tracked, refused in MULTI, read again untracked", app: a, path: "/products/2", want: "HIT"},
			{name: "hit from Redis, untracked", app: b, path: "/products/1", want: "HIT"},
			{name: "miss: answered, not stored", app: a, path: "/products/new", want: "MISS"},
			{name: "miss again: still not stored", app: a, path: "/products/new", want: "MISS"},
			{name: "untagged miss on another instance", app: b, path: "/q?new", want: "MISS"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				rep := tt.app.get(t, tt.path)
				require.Equal(t, http.StatusOK, rep.code, rep.body)
				require.Equal(t, tt.want, rep.header.Get("X-Cache"))
			})
		}
		require.Equal(t, served+3, a.calls.Load()+b.calls.Load(), "only the misses ran the handler")

		v, err := Remember(ctx, a.store, "remembered", time.Minute, func(context.Context) (string, error) { return "fresh", nil }, WithTags("rt"))
		require.NoError(t, err, "Remember computes and answers")
		require.Equal(t, "fresh", v)
		require.ErrorIs(t, a.store.Set(ctx, "set", 1, time.Minute), ErrCacheOutOfMemory)
		require.NoError(t, finish(), "a fill in flight when Redis filled up answers")
		err = a.store.InvalidateTags(ctx, "product:1")
		require.ErrorIs(t, err, ErrCacheOutOfMemory, "a tag bump fails, and says so")
		require.Equal(t, "HIT", a.get(t, "/products/1").header.Get("X-Cache"), "so the entry is still served")

		// The scripts' first writes are deny-OOM: refused, nothing written.
		lk := a.store.lockKey("direct")
		err = a.store.b.Exec(ctx, storeScript, []string{a.store.entryKey("direct"), lk}, []string{"x", "60000", lockTok}).Error()
		require.True(t, isOOM(err), "store script: %v", err)
		held, err := ca.Do(ctx, ca.B().Get().Key(lk).Build()).ToString()
		require.NoError(t, err)
		require.Equal(t, lockTok, held, "the refused store did not release the lock: it wrote nothing")
		err = a.store.b.Exec(ctx, ensureTagScript, []string{a.store.tagKey("new-tag")}, []string{"60000"}).Error()
		require.True(t, isOOM(err), "tag counter script: %v", err)
		a.store.unlock(ctx, "direct", lockTok) // DEL works in a full Redis

		// Invalidations that delete work.
		require.NoError(t, a.store.Delete(ctx, "svc"))
		var s string
		ok, err := a.store.Get(ctx, "svc", &s)
		require.NoError(t, err)
		require.False(t, ok)
		n, err := a.store.Flush(ctx, "GET /q?flush*")
		require.NoError(t, err)
		require.Equal(t, 1, n)
		require.Equal(t, "MISS", a.get(t, "/q?flush=me").header.Get("X-Cache"))

		// Nothing was written: no entry, no tag counter, no lock.
		for _, k := range []string{a.store.entryKey("GET /products/new"), a.store.lockKey("GET /products/new"), a.store.tagKey("product:new"),
			a.store.entryKey("remembered"), a.store.tagKey("rt"), a.store.entryKey("inflight"), a.store.lockKey("inflight"), a.store.lockKey("direct"), a.store.tagKey("new-tag")} {
			n, err := ca.Do(ctx, ca.B().Exists().Key(k).Build()).AsInt64()
			require.NoError(t, err)
			require.Zero(t, n, "%s was written into a full Redis", k)
		}
		require.Equal(t, keys-4, figures(t, addrs).keys, "only deletions: svc, the flushed entry, the two locks")

		// Memory back: misses store again.
		f.Free(t)
		require.Eventually(t, func() bool {
			a.get(t, "/products/new")
			return a.get(t, "/products/new").header.Get("X-Cache") == "HIT"
		}, 10*time.Second, 100*time.Millisecond, "misses are stored again")
	})
}

// TestCacheNeverStoresPrivateResponses: a response marked private,
// no-store or no-cache is never stored, however the directive is written
// and whether the handler or a middleware's Before hook set it (as the
// session middleware does for personal responses: private and Vary:
// Cookie).
func TestCacheNeverStoresPrivateResponses(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		store := newCacheStore(t, r, client, nil)
		e := echo.New()
		e.Use(CacheWithConfig(CacheConfig{Store: store, Vary: []string{}})) // keys are "GET <path>"
		var calls atomic.Int32
		tests := []struct {
			name   string
			header http.Header
			hook   bool // set by a Before hook, not by the handler
			stored bool
		}{
			{name: "private", header: http.Header{"Cache-Control": {"private"}}},
			{name: "PRIVATE, max-age", header: http.Header{"Cache-Control": {"PRIVATE, max-age=60"}}},
			{name: "private with field names", header: http.Header{"Cache-Control": {`private="Set-Cookie", max-age=60`}}},
			{name: "no-store", header: http.Header{"Cache-Control": {"no-store"}}},
			{name: "no-cache", header: http.Header{"Cache-Control": {"max-age=0, no-cache"}}},
			{name: "no-store on a second line", header: http.Header{"Cache-Control": {"public, max-age=60", "no-store"}}},
			{name: "private and Vary: Cookie from a hook", header: http.Header{"Cache-Control": {"private"}, "Vary": {"Cookie"}}, hook: true},
			{name: "no-store from a hook", header: http.Header{"Cache-Control": {"no-store"}}, hook: true},
			{name: "Vary: Cookie alone", header: http.Header{"Vary": {"Cookie"}}, hook: true},
			{name: "public is stored", header: http.Header{"Cache-Control": {"public, max-age=60"}}, stored: true},
			{name: "a directive that only looks private is stored", header: http.Header{"Cache-Control": {"x-private-ish=1"}}, stored: true},
		}
		for i, tt := range tests {
			e.GET(fmt.Sprint("/r", i), func(c echo.Context) error {
				calls.Add(1)
				set := func() {
					for k, vs := range tt.header {
						c.Response().Header()[k] = vs
					}
				}
				if tt.hook {
					c.Response().Before(set)
				} else {
					set()
				}
				return c.String(http.StatusOK, "personal")
			})
		}
		srv := httptest.NewServer(e)
		t.Cleanup(srv.Close)
		app := &cacheApp{srv: srv}
		for i, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				path := fmt.Sprint("/r", i)
				before := calls.Load()
				first := app.get(t, path)
				require.Equal(t, http.StatusOK, first.code)
				require.Equal(t, "personal", first.body)
				second := app.get(t, path)
				require.Equal(t, "personal", second.body)
				exists, err := client.Do(ctx5s(t), client.B().Exists().Key(store.entryKey("GET "+path)).Build()).AsInt64()
				require.NoError(t, err)
				if tt.stored {
					require.Equal(t, "HIT", second.header.Get("X-Cache"))
					require.Equal(t, before+1, calls.Load())
					require.Equal(t, int64(1), exists)
					return
				}
				require.NotEqual(t, "HIT", second.header.Get("X-Cache"))
				require.Equal(t, before+2, calls.Load(), "the handler ran both times")
				require.Zero(t, exists, "nothing stored")
				require.Equal(t, tt.header.Values("Cache-Control"), second.header.Values("Cache-Control"), "the directives reach the client")
			})
		}
	})
}

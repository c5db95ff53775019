package redisecho

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// obsCacheApp is one instance: a CacheStore with an Observer behind the
// response cache, and routes for each outcome. Its cache key is the path
// (only GET and HEAD reach it), so a test can find an entry.
type obsCacheApp struct {
	store *CacheStore
	srv   *httptest.Server
	calls atomic.Int32 // handler runs, every route
	// /gated and /gated-nostore block until their gate is closed.
	gate, gateNoStore chan struct{}
	sawSpan           atomic.Int32 // /traced ran under a span
}

func newObsCacheApp(t *testing.T, r *testRedis, client rueidis.Client, obs Observer, mod func(*CacheStoreConfig, *CacheConfig)) *obsCacheApp {
	t.Helper()
	var cc CacheConfig
	sc := CacheStoreConfig{Client: client, Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger(), Observer: obs}}
	cc.TTL = time.Minute
	cc.KeyFunc = func(c echo.Context) string { return "page:" + c.Request().URL.Path }
	if mod != nil {
		mod(&sc, &cc)
	}
	store, err := NewCacheStore(sc)
	require.NoError(t, err)
	cc.Store = store
	mw, err := cc.ToMiddleware()
	require.NoError(t, err)
	a := &obsCacheApp{store: store, gate: make(chan struct{}), gateNoStore: make(chan struct{})}
	e := echo.New()
	e.HideBanner = true
	e.Use(mw)
	count := func(h echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error { a.calls.Add(1); return h(c) }
	}
	e.GET("/p/:id", count(func(c echo.Context) error {
		return c.JSON(http.StatusOK, map[string]string{"id": c.Param("id")})
	}))
	e.POST("/p/:id", count(func(c echo.Context) error { return c.String(http.StatusOK, "posted") }))
	e.GET("/skip", count(func(c echo.Context) error { return c.String(http.StatusOK, "skipped") }))
	e.GET("/nostore", count(func(c echo.Context) error {
		c.Response().Header().Set(echo.HeaderCacheControl, "no-store")
		return c.String(http.StatusOK, "x")
	}))
	e.GET("/status/:code", count(func(c echo.Context) error {
		code := 0
		fmt.Sscan(c.Param("code"), &code)
		return c.String(code, "status")
	}))
	e.GET("/stream", count(func(c echo.Context) error {
		c.Response().WriteHeader(http.StatusOK)
		_, _ = c.Response().Write([]byte("a"))
		c.Response().Flush()
		return nil
	}))
	e.GET("/gated", count(func(c echo.Context) error {
		<-a.gate
		return c.String(http.StatusOK, "gated")
	}))
	e.GET("/gated-nostore", count(func(c echo.Context) error {
		<-a.gateNoStore
		c.Response().Header().Set(echo.HeaderCacheControl, "no-store")
		return c.String(http.StatusOK, "gated")
	}))
	e.GET("/traced", count(func(c echo.Context) error {
		if c.Request().Context().Value(spanCtxKey{}) != nil {
			a.sawSpan.Add(1)
		}
		return c.String(http.StatusOK, "traced")
	}))
	a.srv = httptest.NewServer(e)
	t.Cleanup(a.srv.Close)
	return a
}

func (a *obsCacheApp) do(t *testing.T, method, path string, headers ...string) reply {
	t.Helper()
	req, err := http.NewRequest(method, a.srv.URL+path, nil)
	if !assert.NoError(t, err) {
		return reply{}
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if !assert.NoError(t, err) {
		return reply{}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return reply{code: resp.StatusCode, header: resp.Header, body: string(body)}
}

func (a *obsCacheApp) get(t *testing.T, path string, headers ...string) reply {
	t.Helper()
	return a.do(t, http.MethodGet, path, headers...)
}

// storedSize is the size of key's entry in Redis.
func storedSize(t *testing.T, client rueidis.Client, cs *CacheStore, key string) int64 {
	t.Helper()
	n, err := client.Do(context.Background(), client.B().Strlen().Key(cs.entryKey(key)).Build()).AsInt64()
	require.NoError(t, err)
	return n
}

// TestObserveCacheMiddleware: every request through the response cache is
// one ObsCacheRequest with the outcome it had; fills are counted with the
// stored entry's size.
func TestObserveCacheMiddleware(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		rec := newRecorder()
		client := r.Client()
		a := newObsCacheApp(t, r, client, rec, func(_ *CacheStoreConfig, c *CacheConfig) {
			c.Skipper = func(c echo.Context) bool { return c.Path() == "/skip" }
		})

		// One miss, then hits.
		require.Equal(t, "MISS", a.get(t, "/p/1").header.Get("X-Cache"))
		for range 3 {
			require.Equal(t, "HIT", a.get(t, "/p/1").header.Get("X-Cache"))
		}
		rec.requireCount(t, 1, ObsCacheRequest, ResultMiss)
		rec.requireCount(t, 3, ObsCacheRequest, ResultHit)
		rec.requireCount(t, 1, ObsCacheFill, ResultNone)
		fill := rec.of(ObsCacheFill)[0]
		require.Equal(t, storedSize(t, client, a.store, "page:/p/1"), fill.Size, "the stored entry's bytes")
		require.Greater(t, fill.Size, int64(len(`{"id":"1"}`)), "the body and its metadata")
		require.Positive(t, fill.Duration)
		require.Equal(t, int64(1), fill.N)
		require.Empty(t, fill.Name)

		// Not looked up: a method, a header, the Skipper.
		require.Equal(t, "posted", a.do(t, http.MethodPost, "/p/1").body)
		require.Equal(t, http.StatusOK, a.get(t, "/p/1", "Authorization", "Bearer x").code)
		require.Equal(t, http.StatusOK, a.get(t, "/p/2", "Cache-Control", "no-store").code)
		require.Equal(t, "skipped", a.get(t, "/skip").body)
		rec.requireCount(t, 4, ObsCacheRequest, ResultBypass)

		// Looked up, missed, not storable: Cache-Control, a status, a stream.
		for range 2 {
			require.Equal(t, "MISS", a.get(t, "/nostore").header.Get("X-Cache"))
		}
		require.Equal(t, http.StatusInternalServerError, a.get(t, "/status/500").code)
		require.Equal(t, "a", a.get(t, "/stream").body)
		rec.requireCount(t, 4, ObsCacheRequest, ResultUncacheable)

		// Exactly one ObsCacheRequest per request, and nothing else.
		rec.requireCount(t, 1+3+4+4, ObsCacheRequest, ResultNone)
		require.Empty(t, rec.of(ObsCacheWait), rec.dump())
		require.Empty(t, rec.of(ObsCacheInvalidation))
		require.Empty(t, rec.of(ObsCacheRequest)[0].Name, "no name: the key or URL is never one")
		require.Equal(t, int64(1), rec.count(ObsCacheFill, ResultNone), "uncacheable responses are no fills")
		st := a.store.Stats()
		require.Equal(t, st.Fills, uint64(rec.count(ObsCacheFill, ResultNone)))
		require.Equal(t, st.Hits, uint64(rec.count(ObsCacheRequest, ResultHit)))
	})
}

// TestObserveCacheStaleWhileRevalidate: a stale entry served while it is
// refreshed is ResultStale; the background refresh is a fill.
func TestObserveCacheStaleWhileRevalidate(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		rec := newRecorder()
		clock := newFakeClock()
		a := newObsCacheApp(t, r, r.Client(), rec, func(s *CacheStoreConfig, c *CacheConfig) {
			s.Clock = clock
			c.StaleWhileRevalidate = time.Hour
		})
		a.get(t, "/p/1")
		rec.requireCount(t, 1, ObsCacheFill, ResultNone)
		clock.Advance(2 * time.Minute)
		rep := a.get(t, "/p/1")
		require.Equal(t, "120", rep.header.Get("Age"), "the stale entry")
		rec.requireCount(t, 1, ObsCacheRequest, ResultStale)
		rec.requireCount(t, 2, ObsCacheFill, ResultNone) // the refresh, in the background
		require.Equal(t, int32(2), a.calls.Load())
		require.Equal(t, "0", a.get(t, "/p/1").header.Get("Age"), "the refreshed entry")
		rec.requireCount(t, 1, ObsCacheRequest, ResultHit)
		rec.requireCount(t, 1, ObsCacheRequest, ResultMiss)
		rec.requireCount(t, 3, ObsCacheRequest, ResultNone)
	})
}

// TestObserveCacheStampede: concurrent misses for one key on two
// instances run the handler once: one fill, every other request a wait
// (here or on the other instance), each request a miss.
func TestObserveCacheStampede(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		recs := []*recorder{newRecorder(), newRecorder()}
		apps := []*obsCacheApp{newObsCacheApp(t, r, r.Client(), recs[0], nil), newObsCacheApp(t, r, r.Client(), recs[1], nil)}
		sum := func(kind ObsKind, res Result) int64 { return recs[0].count(kind, res) + recs[1].count(kind, res) }
		const n = 8
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				rep := apps[i%2].get(t, "/gated")
				assert.Equal(t, "gated", rep.body)
			})
		}
		// The handler is held until every other request waits for it.
		require.Eventually(t, func() bool { return sum(ObsCacheWait, ResultNone) >= n-1 }, 5*time.Second, 5*time.Millisecond,
			"waits: %d\n%s\n%s", sum(ObsCacheWait, ResultNone), recs[0].dump(), recs[1].dump())
		close(apps[0].gate)
		close(apps[1].gate)
		wg.Wait()
		require.Equal(t, int32(1), apps[0].calls.Load()+apps[1].calls.Load(), "one handler run")
		require.Equal(t, int64(1), sum(ObsCacheFill, ResultNone), "one fill")
		require.Equal(t, int64(n-1), sum(ObsCacheWait, ResultNone), "every other request waited once")
		require.Equal(t, int64(n), sum(ObsCacheRequest, ResultMiss), "%s\n%s", recs[0].dump(), recs[1].dump())
		require.Equal(t, int64(n), sum(ObsCacheRequest, ResultNone))
		for i, a := range apps {
			require.Equal(t, a.store.Stats().Waits, uint64(recs[i].count(ObsCacheWait, ResultNone)))
		}

		// The same on one instance for a response that cannot be stored:
		// the waiters compute their own, and every request is uncacheable.
		for _, rec := range recs {
			rec.reset()
		}
		a := apps[0]
		for range n {
			wg.Go(func() { assert.Equal(t, "gated", a.get(t, "/gated-nostore").body) })
		}
		require.Eventually(t, func() bool { return recs[0].count(ObsCacheWait, ResultNone) >= n-1 }, 5*time.Second, 5*time.Millisecond)
		close(a.gateNoStore)
		wg.Wait()
		require.Equal(t, int64(n), recs[0].count(ObsCacheRequest, ResultUncacheable), recs[0].dump())
		require.Equal(t, int64(n), recs[0].count(ObsCacheRequest, ResultNone))
		require.Equal(t, int64(n-1), recs[0].count(ObsCacheWait, ResultNone))
		require.Zero(t, recs[0].count(ObsCacheFill, ResultNone))
	})
}

// TestObserveCacheService: the service's reads (Get, Remember) are
// ObsCacheRequests, its stores fills, and Delete, InvalidateTags and Flush
// invalidations counting what they removed.
func TestObserveCacheService(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		rec := newRecorder()
		clock := newFakeClock()
		client := r.Client()
		cs := newCacheStore(t, r, client, func(c *CacheStoreConfig) { c.Observer = rec; c.Clock = clock })
		ctx := ctx5s(t)
		var v string
		ok, err := cs.Get(ctx, "a", &v)
		require.NoError(t, err)
		require.False(t, ok)
		rec.requireCount(t, 1, ObsCacheRequest, ResultMiss)

		require.NoError(t, cs.Set(ctx, "a", "value of a", time.Minute, "t1"))
		rec.requireCount(t, 1, ObsCacheFill, ResultNone)
		require.Equal(t, storedSize(t, client, cs, "a"), rec.of(ObsCacheFill)[0].Size)
		for range 2 {
			ok, err = cs.Get(ctx, "a", &v)
			require.NoError(t, err)
			require.True(t, ok)
		}
		rec.requireCount(t, 2, ObsCacheRequest, ResultHit)

		calls := 0
		fn := func(context.Context) (string, error) { calls++; return "b", nil }
		for range 3 {
			got, err := Remember(ctx, cs, "b", time.Minute, fn)
			require.NoError(t, err)
			require.Equal(t, "b", got)
		}
		require.Equal(t, 1, calls)
		rec.requireCount(t, 2, ObsCacheRequest, ResultMiss)
		rec.requireCount(t, 4, ObsCacheRequest, ResultHit)
		rec.requireCount(t, 2, ObsCacheFill, ResultNone)

		// An error is not stored: uncacheable; a cached "not found" is a
		// fill, then hits.
		boom := errors.New("boom")
		_, err = Remember(ctx, cs, "c", time.Minute, func(context.Context) (int, error) { return 0, boom })
		require.ErrorIs(t, err, boom)
		rec.requireCount(t, 1, ObsCacheRequest, ResultUncacheable)
		for range 2 {
			_, err = Remember(ctx, cs, "nf", time.Minute, func(context.Context) (int, error) { return 0, ErrCacheNotFound }, CacheNotFound(time.Minute))
			require.ErrorIs(t, err, ErrCacheNotFound)
		}
		rec.requireCount(t, 3, ObsCacheRequest, ResultMiss)
		rec.requireCount(t, 5, ObsCacheRequest, ResultHit)
		rec.requireCount(t, 3, ObsCacheFill, ResultNone)

		// Stale: Get serves it as is, Remember while it refreshes it.
		_, err = Remember(ctx, cs, "s", time.Minute, func(context.Context) (int, error) { return 1, nil }, StaleWhileRevalidate(time.Hour))
		require.NoError(t, err)
		rec.requireCount(t, 4, ObsCacheFill, ResultNone)
		clock.Advance(2 * time.Minute)
		var n int
		ok, err = cs.Get(ctx, "s", &n)
		require.NoError(t, err)
		require.True(t, ok)
		rec.requireCount(t, 1, ObsCacheRequest, ResultStale)
		got, err := Remember(ctx, cs, "s", time.Minute, func(context.Context) (int, error) { return 2, nil }, StaleWhileRevalidate(time.Hour))
		require.NoError(t, err)
		require.Equal(t, 1, got, "the stale value")
		rec.requireCount(t, 2, ObsCacheRequest, ResultStale)
		rec.requireCount(t, 5, ObsCacheFill, ResultNone) // the refresh
		rec.requireCount(t, 4, ObsCacheRequest, ResultMiss)
		rec.requireCount(t, 12, ObsCacheRequest, ResultNone)
		require.Empty(t, rec.of(ObsCacheInvalidation))

		// Invalidations: N is what was removed, when known.
		require.NoError(t, cs.Delete(ctx, "a", "b", "never-stored"))
		require.NoError(t, cs.Delete(ctx, "never-stored"))
		inv := rec.of(ObsCacheInvalidation)
		require.Len(t, inv, 1, "a Delete that removed nothing is no invalidation")
		require.Equal(t, int64(2), inv[0].N, "two entries removed")
		require.NoError(t, cs.InvalidateTags(ctx, "t1", "t2", "t3"))
		inv = rec.of(ObsCacheInvalidation)
		require.Len(t, inv, 2)
		require.Equal(t, int64(3), inv[1].N, "one per tag: the entries it removed are not known")
		for i := range 5 {
			require.NoError(t, cs.Set(ctx, fmt.Sprint("user:", i), i, time.Minute))
		}
		removed, err := cs.Flush(ctx, "user:*")
		require.NoError(t, err)
		require.Equal(t, 5, removed)
		inv = rec.of(ObsCacheInvalidation)
		require.Len(t, inv, 3)
		require.Equal(t, int64(5), inv[2].N)
		_, err = cs.Flush(ctx, "user:*")
		require.NoError(t, err)
		require.Len(t, rec.of(ObsCacheInvalidation), 3, "nothing flushed")
		rec.requireCount(t, 2+3+5, ObsCacheInvalidation, ResultNone)
		rec.requireCount(t, 5+5, ObsCacheFill, ResultNone)
		require.Equal(t, cs.Stats().Fills, uint64(rec.count(ObsCacheFill, ResultNone)))
		require.Equal(t, cs.Stats().Hits, uint64(rec.count(ObsCacheRequest, ResultHit)+rec.count(ObsCacheRequest, ResultStale)))
	})
}

// TestObserveCacheRedisDown: with Redis stopped, and then with the breaker
// open, the cache is bypassed: every read is ResultBypass, nothing is a
// fill.
func TestObserveCacheRedisDown(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		rec := newRecorder()
		br := NewBreaker(BreakerConfig{Failures: 3, Cooldown: time.Hour, Logger: discardLogger()})
		a := newObsCacheApp(t, f.testRedis, f.Client(), rec, func(s *CacheStoreConfig, _ *CacheConfig) {
			s.Timeout = time.Second
			s.Breaker = br
		})
		a.get(t, "/p/1")
		rec.requireCount(t, 1, ObsCacheRequest, ResultMiss)
		rec.requireCount(t, 1, ObsCacheFill, ResultNone)

		f.Stop(t)
		const n = 8
		for i := range n {
			rep := a.get(t, fmt.Sprint("/p/x", i))
			require.Equal(t, http.StatusOK, rep.code)
			require.Equal(t, "MISS", rep.header.Get("X-Cache"), "computed, uncached")
		}
		require.True(t, br.AnyOpen())
		rec.requireCount(t, n, ObsCacheRequest, ResultBypass)

		ctx := context.Background()
		var v string
		_, err := a.store.Get(ctx, "k", &v)
		require.Error(t, err)
		got, err := Remember(ctx, a.store, "k", time.Minute, func(context.Context) (string, error) { return "computed", nil })
		require.NoError(t, err)
		require.Equal(t, "computed", got)
		rec.requireCount(t, n+2, ObsCacheRequest, ResultBypass)
		rec.requireCount(t, n+3, ObsCacheRequest, ResultNone)
		require.Equal(t, int64(1), rec.count(ObsCacheFill, ResultNone), "nothing stored while Redis is down")
	})
}

// spanCtxKey marks the context of a span spanTracer started.
type spanCtxKey struct{}

// spanTracer records spans, safe for concurrent use (fills run on the
// server's goroutines).
type spanTracer struct {
	*recorder
	smu   sync.Mutex
	spans []Span
	ends  map[int][]error // by span index: every end of each
}

func (s *spanTracer) StartSpan(ctx context.Context, sp Span) (context.Context, func(error)) {
	s.smu.Lock()
	defer s.smu.Unlock()
	s.spans = append(s.spans, sp)
	i := len(s.spans) - 1
	return context.WithValue(ctx, spanCtxKey{}, i), func(err error) {
		s.smu.Lock()
		defer s.smu.Unlock()
		if s.ends == nil {
			s.ends = map[int][]error{}
		}
		s.ends[i] = append(s.ends[i], err)
	}
}

func (s *spanTracer) InjectTrace(context.Context) string { return "" }

// started returns the spans and how many of them have ended.
func (s *spanTracer) started() ([]Span, int) {
	s.smu.Lock()
	defer s.smu.Unlock()
	return append([]Span(nil), s.spans...), len(s.ends)
}

// endOf returns the errors span i ended with.
func (s *spanTracer) endOf(i int) []error {
	s.smu.Lock()
	defer s.smu.Unlock()
	return s.ends[i]
}

// TestObserveCacheTracer: one SpanCacheFill per fill, named after the
// store's prefix and ended with its error; none for a hit. The value is
// computed under the span.
func TestObserveCacheTracer(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		tr := &spanTracer{recorder: newRecorder()}
		a := newObsCacheApp(t, r, r.Client(), tr, nil)
		spansNow := func() int { s, _ := tr.started(); return len(s) }

		for range 4 {
			a.get(t, "/p/1")
		}
		tr.requireCount(t, 1, ObsCacheFill, ResultNone)
		tr.requireCount(t, 3, ObsCacheRequest, ResultHit)
		require.Equal(t, 1, spansNow(), "one span for the fill, none for the hits")

		a.get(t, "/traced")
		a.get(t, "/traced")
		require.Equal(t, int32(1), a.sawSpan.Load(), "the handler of a fill runs under its span")
		require.Equal(t, 2, spansNow())

		// The service: Remember's function runs under the span.
		ctx := ctx5s(t)
		var inSpan bool
		for range 2 {
			_, err := Remember(ctx, a.store, "k", time.Minute, func(ctx context.Context) (int, error) {
				inSpan = ctx.Value(spanCtxKey{}) != nil
				return 1, nil
			})
			require.NoError(t, err)
		}
		require.True(t, inSpan)
		require.Equal(t, 3, spansNow())
		boom := errors.New("boom")
		_, err := Remember(ctx, a.store, "fails", time.Minute, func(context.Context) (int, error) { return 0, boom })
		require.ErrorIs(t, err, boom)
		require.NoError(t, a.store.Set(ctx, "set", 1, time.Minute))
		// A computation whose response is not storable is a span too (the
		// fill was tried), but no ObsCacheFill.
		a.get(t, "/nostore")

		tr.requireCount(t, 4, ObsCacheFill, ResultNone)
		require.Eventually(t, func() bool { _, ended := tr.started(); return ended == 6 }, 5*time.Second, 5*time.Millisecond)
		spans, _ := tr.started()
		require.Len(t, spans, 6, "the fills, the failed one and the uncacheable one")
		for i, s := range spans {
			require.Equal(t, SpanCacheFill, s.Op)
			require.Equal(t, r.Keys.Prefix(), s.Name, "the store's prefix")
			ends := tr.endOf(i)
			require.Len(t, ends, 1, "span %d ended once", i)
			if i == 3 {
				require.ErrorIs(t, ends[0], boom, "ended with the fill's error")
			} else {
				require.NoError(t, ends[0], "span %d", i)
			}
		}
	})
}

// TestObserveCacheHitAllocatesNothing: an observer adds no allocation to
// a hit.
func TestObserveCacheHitAllocatesNothing(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		var seen atomic.Int64
		obs := ObserverFunc(func(o Observation) { seen.Add(o.N) })
		client := r.Client()
		ctx := ctx5s(t)
		allocs := func(o Observer) (get, remember float64) {
			ks, err := NewKeyspace(fmt.Sprintf("%sa%t:", r.Keys.Prefix(), o != nil))
			require.NoError(t, err)
			cs, err := NewCacheStore(CacheStoreConfig{Client: client, Options: Options{Prefix: ks.Prefix(), Logger: discardLogger(), Observer: o}})
			require.NoError(t, err)
			require.NoError(t, cs.Set(ctx, "k", 7, time.Minute))
			fn := func(context.Context) (int, error) { return 7, nil }
			var n int
			for range 3 { // warm: served from process memory
				_, err := cs.Get(ctx, "k", &n)
				require.NoError(t, err)
				_, err = Remember(ctx, cs, "k", time.Minute, fn)
				require.NoError(t, err)
			}
			get = testing.AllocsPerRun(200, func() { _, _ = cs.Get(ctx, "k", &n) })
			remember = testing.AllocsPerRun(200, func() { _, _ = Remember(ctx, cs, "k", time.Minute, fn) })
			return get, remember
		}
		g0, r0 := allocs(nil)
		g1, r1 := allocs(obs)
		require.Equal(t, g0, g1, "Get")
		require.Equal(t, r0, r1, "Remember")
		require.Positive(t, seen.Load())
	})
}

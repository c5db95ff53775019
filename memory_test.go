package redisecho

// What hostile traffic leaves in Redis: the junk-traffic test of issue 10,
// and the INFO helpers it shares with the cache's memory and OOM tests.

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// masterAddrs returns the address of every master client serves (one for a
// standalone server).
func masterAddrs(t *testing.T, client rueidis.Client) []string {
	t.Helper()
	ms, err := masters(ctx5s(t), client)
	require.NoError(t, err)
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, nodeAddr(m))
	}
	require.NotEmpty(t, out)
	return out
}

// infoFields returns the "name:value" lines of INFO section on addr.
func infoFields(t *testing.T, addr, section string) map[string]string {
	t.Helper()
	v, err := respDo(addr, 2*time.Second, "INFO", section)
	require.NoError(t, err, "INFO %s on %s", section, addr)
	s, ok := v.(string)
	require.True(t, ok, "INFO reply %T", v)
	out := map[string]string{}
	for _, line := range strings.Split(s, "\r\n") {
		if k, val, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, "#") {
			out[k] = val
		}
	}
	return out
}

// redisFigures is what the memory tests read from every master, summed.
type redisFigures struct {
	usedMemory int64 // INFO memory used_memory
	tracking   int64 // INFO stats tracking_total_keys: keys in the tracking table
	keys       int64 // DBSIZE
}

func (f redisFigures) String() string {
	return fmt.Sprintf("used_memory %d B, tracking_total_keys %d, keys %d", f.usedMemory, f.tracking, f.keys)
}

func figures(t *testing.T, addrs []string) redisFigures {
	t.Helper()
	var out redisFigures
	for _, a := range addrs {
		mem, err := strconv.ParseInt(infoFields(t, a, "memory")["used_memory"], 10, 64)
		require.NoError(t, err)
		trk, err := strconv.ParseInt(infoFields(t, a, "stats")["tracking_total_keys"], 10, 64)
		require.NoError(t, err)
		n, err := respDo(a, 2*time.Second, "DBSIZE")
		require.NoError(t, err)
		out.usedMemory += mem
		out.tracking += trk
		out.keys += n.(int64)
	}
	return out
}

// Bounds stated in the README ("Memory under hostile traffic"), per junk
// request. While the junk's cached 404s and the limiter's per-client state
// live, Redis holds at most junkPeakBytes more per junk request; once they
// have expired, at most junkResidualBytes more (allocator noise; no key is
// left), and at most junkResidualTracking tracking-table entries (none in
// the measurements).
const (
	junkPeakBytes        = 1500
	junkResidualBytes    = 16
	junkResidualTracking = 0.001
)

// TestJunkTrafficLeavesNothing sends 10,000 distinct junk requests (random
// product and user IDs, some long, random queries and Accept headers, each
// from its own client address) to an app shaped like the example's API:
// a rate limiter per client IP in front of the response cache, products
// tagged product:<id> with their 404s cached, users under a custom key with
// 404s not cached. The peak is measured while the state of every junk
// request still lives (the test checks the key count: the junk's 404s and
// the limiter's windows outlast the run, however slow), so the bytes per
// request are real. Then every key the junk left is made to expire at once
// (PEXPIRE 1 ms, so the test need not wait minutes; expiry, not deletion,
// as with the real TTLs). Once they have expired, Redis holds no key more
// than before and its tracking table no entry more: nothing a junk
// request read through client-side caching stays behind.
func TestJunkTrafficLeavesNothing(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		client := f.Client()
		addrs := masterAddrs(t, client)
		opts := Options{Prefix: f.Keys.Prefix(), Logger: discardLogger(), Timeout: 2 * time.Second}
		store, err := NewCacheStore(CacheStoreConfig{Client: client, Options: opts})
		require.NoError(t, err)
		cache := func(cfg CacheConfig) echo.MiddlewareFunc {
			cfg.Store = store
			return CacheWithConfig(cfg)
		}
		e := echo.New()
		e.IPExtractor = echo.ExtractIPFromXFFHeader() // the test client is a trusted (loopback) proxy
		known := map[string]bool{"1": true, "2": true, "3": true}
		product := func(c echo.Context) error {
			if !known[c.Param("id")] {
				return c.JSON(http.StatusNotFound, map[string]string{"error": "Product not found"})
			}
			return c.JSON(http.StatusOK, map[string]string{"id": c.Param("id")})
		}
		user := func(c echo.Context) error {
			if !known[c.Param("id")] {
				return c.JSON(http.StatusNotFound, map[string]string{"error": "User not found"})
			}
			return c.JSON(http.StatusOK, map[string]string{"id": c.Param("id")})
		}
		productTags := func(c echo.Context) []string { return []string{"product:" + c.Param("id")} }
		userKey := func(c echo.Context) string { return "user:" + c.Param("id") }
		// The junk's routes: their 404s and limiter windows outlast the
		// run (junkStateTTL), so that the peak holds every junk request's
		// state at once.
		const junkStateTTL = 10 * time.Minute
		api := e.Group("/api", RateLimitWithConfig(RateLimitConfig{
			Client: client, Options: opts, Name: "api",
			Policies: []Policy{{Limit: 100, Window: junkStateTTL / 2}}, // its state lives about two windows
		}))
		api.GET("/products/:id", product, cache(CacheConfig{TTL: 2 * time.Second, NotFoundTTL: junkStateTTL, Tags: productTags}))
		api.GET("/users/:id", user, cache(CacheConfig{TTL: 2 * time.Second, KeyFunc: userKey}))
		// The same app with short-lived state, for the warm-up.
		warm := e.Group("/warm", RateLimitWithConfig(RateLimitConfig{
			Client: client, Options: opts, Name: "warm",
			Policies: []Policy{{Limit: 100, Window: time.Second}},
		}))
		warm.GET("/products/:id", product, cache(CacheConfig{TTL: 2 * time.Second, NotFoundTTL: time.Second, Tags: productTags}))
		warm.GET("/users/:id", user, cache(CacheConfig{TTL: 2 * time.Second, KeyFunc: userKey}))
		srv := httptest.NewServer(e)
		t.Cleanup(srv.Close)
		httpc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
		t.Cleanup(httpc.CloseIdleConnections)

		get := func(path, ip, accept string) int {
			req, err := http.NewRequest(http.MethodGet, srv.URL+path, nil)
			require.NoError(t, err)
			req.Header.Set("X-Forwarded-For", ip)
			if accept != "" {
				req.Header.Set("Accept", accept)
			}
			resp, err := httpc.Do(req)
			require.NoError(t, err)
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return resp.StatusCode
		}
		// Warm up: connections open, the legit entries hot, and every script
		// loaded on every master (a node's script cache and Lua state are a
		// one-time cost, not a junk request's).
		for range 3 {
			require.Equal(t, http.StatusOK, get("/warm/products/1", "192.0.2.1", ""))
			require.Equal(t, http.StatusOK, get("/warm/users/1", "192.0.2.1", ""))
		}
		for i := range 300 {
			ip := fmt.Sprintf("192.0.2.%d", i%250)
			require.Equal(t, http.StatusNotFound, get(fmt.Sprint("/warm/products/warm", i), ip, ""))
			require.Equal(t, http.StatusNotFound, get(fmt.Sprint("/warm/users/warm", i), ip, ""))
		}
		waitExpired := func(want redisFigures, what string) redisFigures {
			var now redisFigures
			require.Eventually(t, func() bool {
				now = figures(t, addrs)
				return now.keys <= want.keys
			}, 60*time.Second, 250*time.Millisecond, "%s: keys left: %v", what, now)
			return now
		}
		// expireNow makes every key of the test expire at once, through a
		// client of its own, closed after (its connections' buffers are not
		// counted).
		expireNow := func() {
			janitor := f.Client(func(o *rueidis.ClientOption) { o.DisableCache = true })
			defer janitor.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // tens of thousands of keys, under -race
			defer cancel()
			err := scanMasters(ctx, janitor, matchPattern(f.Keys.Prefix()), func(ctx context.Context, node rueidis.Client, keys []string) error {
				cmds := make(rueidis.Commands, len(keys))
				for i, k := range keys {
					cmds[i] = node.B().Pexpire().Key(k).Milliseconds(1).Build()
				}
				for _, r := range node.DoMulti(ctx, cmds...) {
					if err := r.Error(); err != nil {
						return err
					}
				}
				return nil
			})
			require.NoError(t, err)
		}
		// The warm-up's own keys (entries, tag counters, the limiter's
		// state) expire too, the same way as the junk's will (what that
		// costs once is in the baseline): the baseline is the app with
		// nothing cached.
		expireNow()
		before := waitExpired(redisFigures{}, "warm-up")

		const n = 10_000
		rnd := rand.New(rand.NewPCG(1, 2))
		paths, accepts := make([]string, n), make([]string, n)
		for i := range n {
			id := strconv.FormatUint(rnd.Uint64(), 36)
			switch {
			case i%100 == 0:
				id = strings.Repeat("x", 8<<10) + id // long: digested in keys and tags
			case i%7 == 0:
				id = "{" + id + "}:%" // key syntax
			}
			id = url.PathEscape(id)
			switch i % 4 {
			case 0, 1:
				paths[i] = "/api/products/" + id
			case 2:
				paths[i] = "/api/users/" + id
			case 3:
				paths[i] = "/api/products/" + id + "?q=" + strconv.Itoa(i)
				accepts[i] = "application/x-" + strconv.Itoa(i)
			}
		}
		products := 0 // junk requests whose 404 is cached: an entry and a tag counter each
		for _, p := range paths {
			if strings.HasPrefix(p, "/api/products/") {
				products++
			}
		}
		var next atomic.Int64
		var wg sync.WaitGroup
		codes := make([]int, n)
		for range 8 {
			wg.Go(func() {
				for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
					ip := fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)
					codes[i] = get(paths[i], ip, accepts[i])
				}
			})
		}
		wg.Wait()
		for i, c := range codes {
			require.Equal(t, http.StatusNotFound, c, "junk request %d (%.40s) answered", i, paths[i])
		}
		peak := figures(t, addrs)
		// Every junk request's state still lives: the per-request figure is
		// not diluted by what expired during the run.
		require.Equal(t, int64(2*products+n), peak.keys-before.keys, "keys at the peak: an entry and a tag counter per cached 404, a limiter key per client")
		expireNow()
		waitExpired(before, "junk")
		// Lazy frees, dictionary shrinking and tracking cleanup settle.
		var after redisFigures
		settled := func() bool {
			after = figures(t, addrs)
			return float64(after.usedMemory-before.usedMemory)/n <= junkResidualBytes && float64(after.tracking-before.tracking)/n <= junkResidualTracking
		}
		for deadline := time.Now().Add(10 * time.Second); !settled() && time.Now().Before(deadline); {
			time.Sleep(250 * time.Millisecond)
		}

		perReq := func(a, b int64) float64 { return float64(a-b) / n }
		t.Logf("%s: before %v; after %d junk requests %v (%.0f B/request, %.3f tracking entries/request); "+
			"once expired %v (%.1f B/request, %.4f tracking entries/request)",
			f.Topology, before, n, peak, perReq(peak.usedMemory, before.usedMemory), perReq(peak.tracking, before.tracking),
			after, perReq(after.usedMemory, before.usedMemory), perReq(after.tracking, before.tracking))
		require.LessOrEqual(t, perReq(peak.usedMemory, before.usedMemory), float64(junkPeakBytes), "Redis memory per junk request while cached")
		require.LessOrEqual(t, perReq(after.usedMemory, before.usedMemory), float64(junkResidualBytes), "Redis memory per junk request once expired")
		require.LessOrEqual(t, perReq(after.tracking, before.tracking), junkResidualTracking, "tracking-table entries per junk request once expired")
	})
}

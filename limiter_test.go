package redisecho

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// newTestLimiter returns a limiter on client under r's prefix.
func newTestLimiter(t *testing.T, r *testRedis, client rueidis.Client, cfg LimiterConfig) *Limiter {
	t.Helper()
	cfg.Client = client
	cfg.Prefix = r.Keys.Prefix()
	if cfg.Name == "" {
		cfg.Name = t.Name() // tests reuse clients and prefixes with other policies
	}
	if cfg.Logger == nil {
		cfg.Logger = discardLogger()
	}
	l, err := NewLimiter(cfg)
	require.NoError(t, err)
	return l
}

func allow(t *testing.T, l *Limiter, key string, n int64) Decision {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d, err := l.AllowN(ctx, key, n)
	require.NoError(t, err)
	return d
}

func TestLimiterConfigErrors(t *testing.T) {
	c := standaloneClient(t)
	for _, tc := range []struct {
		name string
		cfg  LimiterConfig
	}{
		{"zero limit", LimiterConfig{Client: c, Policies: []Policy{{Limit: 0, Window: time.Second}}}},
		{"short window", LimiterConfig{Client: c, Policies: []Policy{{Limit: 1, Window: time.Microsecond}}}},
		{"unknown algorithm", LimiterConfig{Client: c, Policies: []Policy{{Limit: 1, Window: time.Second, Algorithm: 9}}}},
		{"negative burst", LimiterConfig{Client: c, Policies: []Policy{{Limit: 1, Window: time.Second, Algorithm: TokenBucket, Burst: -1}}}},
		{"same name", LimiterConfig{Client: c, Policies: []Policy{{Name: "a", Limit: 1, Window: time.Second}, {Name: "a", Limit: 1, Window: time.Minute}}}},
		{"same algorithm and window", LimiterConfig{Client: c, Policies: []Policy{PerMinute(1), PerMinute(2)}}},
		{"non-ASCII name", LimiterConfig{Client: c, Policies: []Policy{{Name: "é", Limit: 1, Window: time.Second}}}},
		{"fallback without share", LimiterConfig{Client: c, Policies: []Policy{PerMinute(1)}, OnRedisError: LocalFallback}},
		{"fallback share above 1", LimiterConfig{Client: c, Policies: []Policy{PerMinute(1)}, OnRedisError: LocalFallback, FallbackShare: 1.5}},
		{"unknown failure policy", LimiterConfig{Client: c, Policies: []Policy{PerMinute(1)}, OnRedisError: 7}},
		{"prefix with a brace", LimiterConfig{Client: c, Policies: []Policy{PerMinute(1)}, Options: Options{Prefix: "a{"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewLimiter(tc.cfg)
			require.Error(t, err)
		})
	}
	_, err := NewLimiter(LimiterConfig{Policies: []Policy{PerMinute(1)}})
	require.ErrorIs(t, err, ErrNilClient)

	l, err := NewLimiter(LimiterConfig{Client: c, Policies: []Policy{PerMinute(100), {Algorithm: TokenBucket, Limit: 10, Window: time.Second}}})
	require.NoError(t, err)
	require.Equal(t, []Policy{
		{Name: "100-per-1m", Algorithm: SlidingWindow, Limit: 100, Window: time.Minute},
		{Name: "10-per-1s-token-bucket", Algorithm: TokenBucket, Limit: 10, Window: time.Second, Burst: 10},
	}, l.Policies(), "defaults: sliding window, a name, Burst = Limit")

	ctx := context.Background()
	_, err = l.Allow(ctx, "")
	require.ErrorIs(t, err, ErrInvalidLimiterKey)
	_, err = l.AllowN(ctx, "k", 11)
	require.ErrorIs(t, err, ErrCostTooHigh, "a cost above the bucket can never pass")
	_, err = l.AllowN(ctx, "k", -1)
	require.ErrorIs(t, err, ErrInvalidLimiterConfig)
}

// TestLimiterSequence checks each algorithm's first decisions: limit 3,
// window long enough that nothing refills during the test.
func TestLimiterSequence(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		for _, alg := range []Algorithm{SlidingWindow, FixedWindow, SlidingLog, TokenBucket} {
			t.Run(alg.String(), func(t *testing.T) {
				l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: alg, Limit: 3, Window: time.Hour}}})
				for i, want := range []int64{2, 1, 0} {
					d := allow(t, l, "client", 1)
					require.True(t, d.Allowed, "request %d", i+1)
					require.Equal(t, int64(3), d.Limit)
					require.Equal(t, want, d.Remaining, "request %d", i+1)
					require.Zero(t, d.RetryAfter)
					require.Greater(t, d.Reset, time.Duration(0))
					require.LessOrEqual(t, d.Reset, 2*time.Hour)
					require.WithinDuration(t, time.Now(), d.Time, 5*time.Second, "Redis TIME")
				}
				d := allow(t, l, "client", 1)
				require.False(t, d.Allowed)
				require.Zero(t, d.Remaining)
				require.Greater(t, d.RetryAfter, time.Duration(0))
				require.LessOrEqual(t, d.RetryAfter, 2*time.Hour)
				require.Len(t, d.Policies, 1)
				require.False(t, d.Policies[0].Allowed)

				peek := allow(t, l, "client", 0)
				require.True(t, peek.Allowed, "cost 0 reads")
				require.Zero(t, peek.Remaining)

				other := allow(t, l, "other client", 1)
				require.True(t, other.Allowed, "keys are independent")
				require.Equal(t, int64(2), other.Remaining)
			})
		}
	})
}

// TestLimiterGCRAVectors checks the token bucket against the GCRA
// definition: with emission interval T and burst b, b requests pass back
// to back, the next waits T, then one passes per T.
func TestLimiterGCRAVectors(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		const T = 200 * time.Millisecond
		l := newTestLimiter(t, r, r.Client(), LimiterConfig{Policies: []Policy{{Algorithm: TokenBucket, Limit: 5, Window: 5 * T, Burst: 3}}})
		for i, want := range []int64{2, 1, 0} {
			d := allow(t, l, "k", 1)
			require.True(t, d.Allowed, "burst request %d", i+1)
			require.Equal(t, want, d.Remaining)
			require.InDelta(t, float64(time.Duration(i+1)*T), float64(d.Reset), float64(20*time.Millisecond), "reset: the bucket is full again after one T per token used")
		}
		d := allow(t, l, "k", 1)
		require.False(t, d.Allowed, "burst exhausted")
		require.Greater(t, d.RetryAfter, T-50*time.Millisecond)
		require.LessOrEqual(t, d.RetryAfter, T)
		for round := range 3 {
			time.Sleep(d.RetryAfter)
			d = allow(t, l, "k", 1)
			require.True(t, d.Allowed, "one per emission interval, round %d", round)
			d = allow(t, l, "k", 1)
			require.False(t, d.Allowed, "only one, round %d", round)
			require.InDelta(t, float64(T), float64(d.RetryAfter), float64(60*time.Millisecond))
		}
		// Idle for the whole bucket: the burst is back, not more.
		time.Sleep(3*T + 20*time.Millisecond)
		n := 0
		for allow(t, l, "k", 1).Allowed {
			n++
		}
		require.Equal(t, 3, n)
	})
}

// TestLimiterBoundaries checks window edges and refills with short windows.
func TestLimiterBoundaries(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		const W = 400 * time.Millisecond

		t.Run("fixed window starts at the first hit", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: FixedWindow, Limit: 2, Window: W}}})
			first := allow(t, l, "k", 1)
			require.InDelta(t, float64(W), float64(first.Reset), float64(5*time.Millisecond))
			time.Sleep(W / 2)
			require.True(t, allow(t, l, "k", 1).Allowed)
			d := allow(t, l, "k", 1)
			require.False(t, d.Allowed)
			require.InDelta(t, float64(W/2), float64(d.RetryAfter), float64(60*time.Millisecond), "retry at the window's end, counted from the first hit")
			time.Sleep(d.RetryAfter)
			d = allow(t, l, "k", 1)
			require.True(t, d.Allowed, "a new window")
			require.Equal(t, int64(1), d.Remaining)
			require.InDelta(t, float64(W), float64(d.Reset), float64(5*time.Millisecond), "the new window starts at this hit")
		})

		t.Run("sliding log frees the oldest entry first", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: SlidingLog, Limit: 2, Window: W}}})
			require.True(t, allow(t, l, "k", 1).Allowed)
			time.Sleep(W / 2)
			require.True(t, allow(t, l, "k", 1).Allowed)
			d := allow(t, l, "k", 1)
			require.False(t, d.Allowed)
			require.InDelta(t, float64(W/2), float64(d.RetryAfter), float64(60*time.Millisecond))
			time.Sleep(d.RetryAfter)
			require.True(t, allow(t, l, "k", 1).Allowed, "the first entry left the window")
			require.False(t, allow(t, l, "k", 1).Allowed, "the second is still in it")
			// Hammering while denied records nothing: once the client stops
			// for a window, it has its whole limit back.
			for range 20 {
				allow(t, l, "k", 1)
			}
			time.Sleep(W + 10*time.Millisecond)
			require.Equal(t, int64(1), allow(t, l, "k", 1).Remaining)
		})

		t.Run("sliding counter refills as the previous window slides out", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: SlidingWindow, Limit: 4, Window: W}}})
			n := 0
			for allow(t, l, "k", 1).Allowed {
				n++
			}
			require.Equal(t, 4, n)
			d := allow(t, l, "k", 1)
			require.False(t, d.Allowed)
			require.LessOrEqual(t, d.RetryAfter, 2*W)
			time.Sleep(d.RetryAfter)
			require.True(t, allow(t, l, "k", 1).Allowed, "admitted at RetryAfter")
			time.Sleep(2*W + 10*time.Millisecond)
			require.Equal(t, int64(3), allow(t, l, "k", 1).Remaining, "two windows later the counters are gone")
		})
	})
}

// TestLimiterCost checks AllowN: a request passes only if every unit fits.
func TestLimiterCost(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		for _, alg := range []Algorithm{SlidingWindow, FixedWindow, SlidingLog, TokenBucket} {
			t.Run(alg.String(), func(t *testing.T) {
				l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: alg, Limit: 5, Window: time.Hour}}})
				require.Equal(t, int64(3), allow(t, l, "k", 2).Remaining)
				require.Equal(t, int64(1), allow(t, l, "k", 2).Remaining)
				d := allow(t, l, "k", 2)
				require.False(t, d.Allowed, "2 units do not fit in 1")
				require.Equal(t, int64(1), d.Remaining, "the denial took nothing")
				d = allow(t, l, "k", 1)
				require.True(t, d.Allowed, "1 unit fits")
				require.Zero(t, d.Remaining)
			})
		}
	})
}

// TestLimiterMultiPolicy checks that policies are decided together: a
// request denied by one consumes none of the others.
func TestLimiterMultiPolicy(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{
			{Name: "burst", Algorithm: FixedWindow, Limit: 3, Window: time.Hour},
			{Name: "daily", Algorithm: SlidingLog, Limit: 5, Window: 24 * time.Hour},
			{Name: "bucket", Algorithm: TokenBucket, Limit: 4, Window: time.Hour},
			{Name: "hourly", Algorithm: SlidingWindow, Limit: 6, Window: time.Hour},
		}})
		for range 3 {
			require.True(t, allow(t, l, "k", 1).Allowed)
		}
		for range 5 {
			d := allow(t, l, "k", 1)
			require.False(t, d.Allowed)
			require.Equal(t, "burst", bindingName(d), "the binding policy is the one that denies")
		}
		peek := allow(t, l, "k", 0)
		require.Equal(t, []int64{0, 2, 1, 3}, remainings(peek), "denied requests consumed nothing anywhere")
		log := l.keys("k")[1]
		n, err := c.Do(context.Background(), c.B().Zcard().Key(log).Build()).AsInt64()
		require.NoError(t, err)
		require.Equal(t, int64(3), n, "the log recorded admitted requests only")

		// The bucket (1 left) denies a cost of 2 that the others would admit.
		require.NoError(t, l.Reset(context.Background(), "k"))
		allow(t, l, "k", 3)
		d := allow(t, l, "k", 0)
		require.Equal(t, []int64{0, 2, 1, 3}, remainings(d))

		t.Run("under concurrency", func(t *testing.T) {
			l2 := newTestLimiter(t, r, r.Client(), LimiterConfig{Name: l.name, Policies: l.policies})
			var mu sync.Mutex
			admitted := 0
			hammer(t, []*Limiter{l, l2}, "c", 200*time.Millisecond, func(d Decision) {
				if d.Allowed {
					mu.Lock()
					admitted++
					mu.Unlock()
				}
			})
			require.Equal(t, 3, admitted, "exactly the tightest limit")
			require.Equal(t, []int64{0, 2, 1, 3}, remainings(allow(t, l, "c", 0)))
		})
	})
}

func bindingName(d Decision) string {
	for _, pd := range d.Policies {
		if pd.RetryAfter == d.RetryAfter && !pd.Allowed {
			return pd.Policy.Name
		}
	}
	return ""
}

func remainings(d Decision) []int64 {
	var out []int64
	for _, pd := range d.Policies {
		out = append(out, pd.Remaining)
	}
	return out
}

// hammer calls Allow on key from 8 goroutines per limiter for dur, and
// hands every decision to record.
func hammer(t *testing.T, ls []*Limiter, key string, dur time.Duration, record func(Decision)) {
	t.Helper()
	var wg sync.WaitGroup
	end := time.Now().Add(dur)
	errs := make(chan error, 16*len(ls))
	for _, l := range ls {
		for range 8 {
			wg.Go(func() {
				for time.Now().Before(end) {
					d, err := l.Allow(context.Background(), key)
					if err != nil {
						errs <- err
						return
					}
					record(d)
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
}

// TestLimiterConcurrencyBounds hammers one key through two clients (two
// instances) and checks each algorithm's bound on the admitted requests,
// timed by the Redis TIME of their decisions.
func TestLimiterConcurrencyBounds(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		const (
			L = 20
			W = 250 * time.Millisecond
		)
		c1, c2 := r.Client(), r.Client()
		for _, alg := range []Algorithm{SlidingWindow, FixedWindow, SlidingLog, TokenBucket} {
			t.Run(alg.String(), func(t *testing.T) {
				cfg := LimiterConfig{Policies: []Policy{{Algorithm: alg, Limit: L, Window: W, Burst: 5}}, DisableFreePath: true}
				ls := []*Limiter{newTestLimiter(t, r, c1, cfg), newTestLimiter(t, r, c2, cfg)}
				var mu sync.Mutex
				var times []time.Time
				var tokens []string
				total := 0
				hammer(t, ls, "k", 1200*time.Millisecond, func(d Decision) {
					mu.Lock()
					defer mu.Unlock()
					total++
					if d.Allowed {
						times = append(times, d.Time)
						tokens = append(tokens, d.refund.tokens[0])
					}
				})
				require.Greater(t, total, 4*len(times), "the key was over its limit most of the time")
				sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
				t.Logf("%d decisions, %d admitted over %v", total, len(times), times[len(times)-1].Sub(times[0]))
				switch alg {
				case FixedWindow:
					perWindow := map[string]int{}
					for _, tok := range tokens {
						perWindow[tok]++
					}
					full := 0
					for start, n := range perWindow {
						require.LessOrEqual(t, n, L, "window starting at %s", start)
						if n == L {
							full++
						}
					}
					require.Greater(t, full, 1, "windows fill up to the limit")
				case SlidingLog:
					for i := range times {
						n := 0
						for j := i; j >= 0 && times[i].Sub(times[j]) < W; j-- {
							n++
						}
						require.LessOrEqual(t, n, L, "rolling window ending at admission %d", i)
					}
				case SlidingWindow:
					perWindow := map[int64]int{}
					for _, tm := range times {
						perWindow[tm.UnixMicro()/W.Microseconds()]++
					}
					for idx, n := range perWindow {
						require.LessOrEqual(t, n, L, "aligned window %d", idx)
					}
					for i, ti := range times {
						f := float64(ti.UnixMicro()%W.Microseconds()) / float64(W.Microseconds())
						n := 0
						for j := i; j >= 0 && ti.Sub(times[j]) < W; j-- {
							n++
						}
						require.LessOrEqual(t, float64(n), L*(1+f)+1e-9, "rolling window ending at admission %d (f=%.2f)", i, f)
					}
				case TokenBucket:
					T := W / L
					for i := range times {
						for j := i; j < len(times); j++ {
							bound := 5 + float64(times[j].Sub(times[i])+time.Microsecond)/float64(T)
							require.LessOrEqual(t, float64(j-i+1), bound, "admissions %d..%d", i, j)
						}
					}
				}
			})
		}
	})
}

func TestLimiterRefund(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		ctx := context.Background()
		for _, alg := range []Algorithm{SlidingWindow, FixedWindow, SlidingLog, TokenBucket} {
			t.Run(alg.String(), func(t *testing.T) {
				l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: alg, Limit: 3, Window: time.Hour}}, DisableFreePath: true})
				var ds []Decision
				for range 3 {
					ds = append(ds, allow(t, l, "k", 1))
				}
				denied := allow(t, l, "k", 1)
				require.False(t, denied.Allowed)
				require.NoError(t, l.Refund(ctx, &denied), "refunding a denial is a no-op")
				require.False(t, allow(t, l, "k", 1).Allowed)

				require.NoError(t, l.Refund(ctx, &ds[1]))
				d := allow(t, l, "k", 1)
				require.True(t, d.Allowed, "the refunded unit is back")
				require.Zero(t, d.Remaining)

				require.NoError(t, l.Refund(ctx, &ds[0]))
				require.NoError(t, l.Refund(ctx, &ds[2]))
				require.Equal(t, int64(2), allow(t, l, "k", 0).Remaining)
			})
		}
	})
}

func TestLimiterPerRequestPolicies(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		l := newTestLimiter(t, r, r.Client(), LimiterConfig{})
		ctx := context.Background()
		free := Policy{Algorithm: FixedWindow, Limit: 2, Window: time.Hour}
		pro := Policy{Algorithm: FixedWindow, Limit: 5, Window: time.Hour}
		for range 2 {
			d, err := l.AllowPolicies(ctx, "user", 1, free)
			require.NoError(t, err)
			require.True(t, d.Allowed)
		}
		d, err := l.AllowPolicies(ctx, "user", 1, free)
		require.NoError(t, err)
		require.False(t, d.Allowed)
		d, err = l.AllowPolicies(ctx, "user", 1, pro)
		require.NoError(t, err)
		require.True(t, d.Allowed, "an upgrade applies at once")
		require.Equal(t, int64(2), d.Remaining, "and keeps the count: 3 of 5 used")
		_, err = l.Allow(ctx, "user")
		require.ErrorIs(t, err, ErrInvalidLimiterConfig, "no policy")
	})
}

// TestLimiterHostileKeys checks that keys from users stay inside the
// limiter's namespace and slot, whatever they hold.
func TestLimiterHostileKeys(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: SlidingLog, Limit: 1, Window: time.Hour}, PerHour(1)}})
		long := string(make([]byte, 4096))
		keys := []string{"}{", "a}:{b", "x:y", "x%3Ay", "%", "{", long, "\x00\xff"}
		for _, k := range keys {
			require.True(t, allow(t, l, k, 1).Allowed, "key %q", k)
			ks := l.keys(normKey(k))
			require.Equal(t, keySlot(ks[0]), keySlot(ks[1]), "one slot per key")
			require.Less(t, len(ks[0]), 300)
		}
		for _, k := range keys {
			require.False(t, allow(t, l, k, 1).Allowed, "key %q kept its own counter", k)
		}
		require.Equal(t, 2*len(keys), countKeys(t, r, c))
	})
}

func TestLimiterAlgorithmString(t *testing.T) {
	for a, want := range map[Algorithm]string{SlidingWindow: "sliding-window", FixedWindow: "fixed-window", SlidingLog: "sliding-log", TokenBucket: "token-bucket", 9: "Algorithm(9)"} {
		require.Equal(t, want, a.String())
	}
	for f, want := range map[FailurePolicy]string{FailOpen: "fail-open", FailClosed: "fail-closed", LocalFallback: "local-fallback", 9: "FailurePolicy(" + strconv.Itoa(9) + ")"} {
		require.Equal(t, want, f.String())
	}
}

// rlServer is an Echo app with a rate-limited route, served in process:
// each request names its client address.
type rlServer struct {
	e *echo.Echo
}

func newRLServer(t *testing.T, cfg RateLimitConfig, handler echo.HandlerFunc) *rlServer {
	t.Helper()
	if cfg.Logger == nil && cfg.Limiter == nil {
		cfg.Logger = discardLogger()
	}
	mw, err := cfg.ToMiddleware()
	require.NoError(t, err)
	e := echo.New()
	if handler == nil {
		handler = func(c echo.Context) error { return c.JSON(http.StatusOK, map[string]string{"ok": "yes"}) }
	}
	e.Any("/r", handler, mw)
	return &rlServer{e: e}
}

// do sends a request to /r from remote (host:port), with headers h.
func (s *rlServer) do(remote string, h http.Header) *httptest.ResponseRecorder {
	req := httptest.NewRequest(http.MethodGet, "/r", nil)
	req.RemoteAddr = remote
	maps.Copy(req.Header, h)
	rec := httptest.NewRecorder()
	s.e.ServeHTTP(rec, req)
	return rec
}

// sfItems parses a header as an RFC 9651 List into items by name.
func sfItems(t *testing.T, h http.Header, name string) map[string]sfItem {
	t.Helper()
	vals := h.Values(name)
	require.NotEmpty(t, vals, "header %s", name)
	items, err := parseSFList(strings.Join(vals, ", "))
	require.NoError(t, err, "%s: %q", name, vals)
	out := map[string]sfItem{}
	for _, it := range items {
		id, ok := it.Value.(string)
		require.True(t, ok, "%s: each item is a String naming a policy, got %T", name, it.Value)
		out[id] = it
	}
	return out
}

func sfInt(t *testing.T, it sfItem, key string) int64 {
	t.Helper()
	v, ok := it.Param(key)
	require.True(t, ok, "parameter %s", key)
	n, ok := v.(int64)
	require.True(t, ok, "parameter %s is an Integer, got %T", key, v)
	return n
}

// TestRateLimitHeaders checks the draft fields (parsed as structured
// fields), the legacy fields and Retry-After.
func TestRateLimitHeaders(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		s := newRLServer(t, RateLimitConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}, Policies: []Policy{
			{Name: "burst", Algorithm: FixedWindow, Limit: 2, Window: 10 * time.Second},
			{Name: "daily \"quota\"", Limit: 100, Window: 24 * time.Hour},
		}}, nil)
		for i, want := range []int64{1, 0} {
			rec := s.do("192.0.2.1:1000", nil)
			require.Equal(t, http.StatusOK, rec.Code)
			pol := sfItems(t, rec.Header(), "RateLimit-Policy")
			require.Len(t, pol, 2)
			require.Equal(t, int64(2), sfInt(t, pol["burst"], "q"))
			require.Equal(t, int64(10), sfInt(t, pol["burst"], "w"))
			require.Equal(t, int64(100), sfInt(t, pol[`daily "quota"`], "q"))
			require.Equal(t, int64(86400), sfInt(t, pol[`daily "quota"`], "w"))
			cur := sfItems(t, rec.Header(), "RateLimit")
			require.Equal(t, want, sfInt(t, cur["burst"], "r"), "request %d", i)
			require.Equal(t, 99-int64(i), sfInt(t, cur[`daily "quota"`], "r"))
			tb := sfInt(t, cur["burst"], "t")
			require.True(t, tb >= 9 && tb <= 10, "t=%d", tb)
			require.Equal(t, "2", rec.Header().Get("X-RateLimit-Limit"))
			require.Equal(t, strconv.FormatInt(want, 10), rec.Header().Get("X-RateLimit-Remaining"))
			reset, err := strconv.ParseInt(rec.Header().Get("X-RateLimit-Reset"), 10, 64)
			require.NoError(t, err)
			require.InDelta(t, time.Now().Add(10*time.Second).Unix(), reset, 2, "Unix seconds of the window's end")
			require.Empty(t, rec.Header().Get(echo.HeaderRetryAfter))
		}
		rec := s.do("192.0.2.1:1000", nil)
		require.Equal(t, http.StatusTooManyRequests, rec.Code)
		require.JSONEq(t, `{"error":"Too many requests, please try again later."}`, rec.Body.String())
		retry, err := strconv.Atoi(rec.Header().Get(echo.HeaderRetryAfter))
		require.NoError(t, err)
		require.True(t, retry >= 1 && retry <= 10, "Retry-After %d", retry)
		cur := sfItems(t, rec.Header(), "RateLimit")
		require.Zero(t, sfInt(t, cur["burst"], "r"))
		for name, it := range cur {
			require.LessOrEqual(t, sfInt(t, it, "t"), int64(retry), "-11 §6: Retry-After not before the end of %s's effective window", name)
		}
		require.Equal(t, "0", rec.Header().Get("X-RateLimit-Remaining"))

		rec = s.do("192.0.2.2:1000", nil)
		require.Equal(t, http.StatusOK, rec.Code, "another client has its own quota")
	})
}

func TestRateLimitHeaderSwitches(t *testing.T) {
	c := standaloneClient(t)
	prefix := testPrefix(t)
	for _, tc := range []struct {
		name                     string
		cfg                      RateLimitConfig
		draft, legacy, retryHead bool
	}{
		{"defaults", RateLimitConfig{}, true, true, true},
		{"no draft", RateLimitConfig{DisableDraftHeaders: true}, false, true, true},
		{"no legacy", RateLimitConfig{DisableLegacyHeaders: true}, true, false, true},
		{"no Retry-After", RateLimitConfig{DisableRetryAfter: true}, true, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.Client, cfg.Prefix, cfg.Name = c, prefix, tc.name
			cfg.Policies = []Policy{{Limit: 1, Window: time.Minute}}
			s := newRLServer(t, cfg, nil)
			s.do("192.0.2.9:1", nil)
			rec := s.do("192.0.2.9:1", nil)
			require.Equal(t, http.StatusTooManyRequests, rec.Code)
			h := rec.Header()
			require.Equal(t, tc.draft, h.Get("RateLimit") != "" && h.Get("RateLimit-Policy") != "")
			require.Equal(t, tc.legacy, h.Get("X-RateLimit-Limit") != "" && h.Get("X-RateLimit-Remaining") != "" && h.Get("X-RateLimit-Reset") != "")
			require.Equal(t, tc.retryHead, h.Get(echo.HeaderRetryAfter) != "")
		})
	}
}

func TestRateLimitResponses(t *testing.T) {
	c := standaloneClient(t)
	prefix := testPrefix(t)
	one := []Policy{{Limit: 1, Window: time.Minute}}

	t.Run("custom message", func(t *testing.T) {
		s := newRLServer(t, RateLimitConfig{Client: c, Options: Options{Prefix: prefix}, Name: "msg", Policies: one, Message: map[string]string{"error": "slow down"}}, nil)
		s.do("192.0.2.1:1", nil)
		rec := s.do("192.0.2.1:1", nil)
		require.Equal(t, http.StatusTooManyRequests, rec.Code)
		require.JSONEq(t, `{"error":"slow down"}`, rec.Body.String())
	})
	t.Run("denied handler", func(t *testing.T) {
		s := newRLServer(t, RateLimitConfig{Client: c, Options: Options{Prefix: prefix}, Name: "handler", Policies: []Policy{{Algorithm: FixedWindow, Limit: 1, Window: time.Minute}},
			DeniedHandler: func(c echo.Context, d Decision) error {
				return c.String(http.StatusServiceUnavailable, "retry in "+strconv.FormatInt(seconds(d.RetryAfter), 10))
			}}, nil)
		s.do("192.0.2.1:1", nil)
		rec := s.do("192.0.2.1:1", nil)
		require.Equal(t, http.StatusServiceUnavailable, rec.Code)
		require.Equal(t, "retry in 60", rec.Body.String())
		require.Equal(t, "60", rec.Header().Get(echo.HeaderRetryAfter), "headers are set before the handler")
	})
	t.Run("skipper", func(t *testing.T) {
		s := newRLServer(t, RateLimitConfig{Client: c, Options: Options{Prefix: prefix}, Name: "skip", Policies: one,
			Skipper: func(c echo.Context) bool { return c.Request().Header.Get("X-Internal") == "1" }}, nil)
		for range 3 {
			require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", http.Header{"X-Internal": {"1"}}).Code)
		}
		require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", nil).Code, "skipped requests were not counted")
		require.Equal(t, http.StatusTooManyRequests, s.do("192.0.2.1:1", nil).Code)
	})
	t.Run("key function errors", func(t *testing.T) {
		s := newRLServer(t, RateLimitConfig{Client: c, Options: Options{Prefix: prefix}, Name: "keyerr", Policies: one,
			KeyFunc: func(c echo.Context) (string, error) {
				if c.Request().Header.Get("X-Api-Key") == "" {
					return "", echo.NewHTTPError(http.StatusUnauthorized, "API key required")
				}
				return "", errors.New("internal detail: lookup failed")
			}}, nil)
		rec := s.do("192.0.2.1:1", nil)
		require.Equal(t, http.StatusUnauthorized, rec.Code)
		rec = s.do("192.0.2.1:1", http.Header{"X-Api-Key": {"k"}})
		require.Equal(t, http.StatusInternalServerError, rec.Code, "a server fault, logged")
		require.NotContains(t, rec.Body.String(), "internal detail")
	})
	t.Run("cost above the limit", func(t *testing.T) {
		s := newRLServer(t, RateLimitConfig{Client: c, Options: Options{Prefix: prefix}, Name: "cost", Policies: []Policy{{Limit: 5, Window: time.Minute}},
			Cost: func(c echo.Context) int64 {
				n, _ := strconv.ParseInt(c.Request().Header.Get("X-Cost"), 10, 64)
				return n
			}}, nil)
		require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", http.Header{"X-Cost": {"4"}}).Code)
		rec := s.do("192.0.2.1:1", http.Header{"X-Cost": {"2"}})
		require.Equal(t, http.StatusTooManyRequests, rec.Code)
		require.Equal(t, "1", rec.Header().Get("X-RateLimit-Remaining"))
		require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", http.Header{"X-Cost": {"1"}}).Code)
		require.Equal(t, http.StatusBadRequest, s.do("192.0.2.2:1", http.Header{"X-Cost": {"6"}}).Code, "never admissible: retrying is pointless")
	})
	t.Run("invalid configurations", func(t *testing.T) {
		l, err := NewLimiter(LimiterConfig{Client: c, Policies: one})
		require.NoError(t, err)
		for name, cfg := range map[string]RateLimitConfig{
			"no client":                        {},
			"refunds with a free-path Limiter": {Limiter: l, SkipSuccessfulRequests: true},
			"no policy on a Limiter":           {Limiter: must(NewLimiter(LimiterConfig{Client: c, Name: "empty"}))},
			"bad policy":                       {Client: c, Policies: []Policy{{Limit: -1, Window: time.Second}}},
		} {
			_, err := cfg.ToMiddleware()
			require.Error(t, err, name)
		}
		require.Panics(t, func() { RateLimit(nil) })
	})
}

// TestRateLimitRefunds checks SkipSuccessfulRequests (the guide's login
// limiter) and SkipFailedRequests.
func TestRateLimitRefunds(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		login := func(c echo.Context) error {
			if c.QueryParam("password") != "secret" {
				return echo.NewHTTPError(http.StatusUnauthorized, "Invalid credentials")
			}
			return c.JSON(http.StatusOK, map[string]string{"message": "Login successful"})
		}
		for _, alg := range []Algorithm{SlidingWindow, FixedWindow, SlidingLog, TokenBucket} {
			t.Run(alg.String(), func(t *testing.T) {
				s := newRLServer(t, RateLimitConfig{Client: c, Options: Options{Prefix: r.Keys.Prefix()}, Name: "login-" + alg.String(),
					Policies: []Policy{{Algorithm: alg, Limit: 3, Window: 15 * time.Minute}}, SkipSuccessfulRequests: true}, login)
				try := func(pw string) int {
					req := httptest.NewRequest(http.MethodPost, "/r?password="+pw, nil)
					req.RemoteAddr = "192.0.2.7:1"
					rec := httptest.NewRecorder()
					s.e.ServeHTTP(rec, req)
					return rec.Code
				}
				for range 10 {
					require.Equal(t, http.StatusOK, try("secret"), "successful logins are not counted")
				}
				for range 3 {
					require.Equal(t, http.StatusUnauthorized, try("wrong"))
				}
				require.Equal(t, http.StatusTooManyRequests, try("secret"), "three failures lock the key, right password or not")
			})
		}
		t.Run("skip failed", func(t *testing.T) {
			fail := false
			s := newRLServer(t, RateLimitConfig{Client: c, Options: Options{Prefix: r.Keys.Prefix()}, Name: "skip-failed",
				Policies: []Policy{{Limit: 2, Window: time.Hour}}, SkipFailedRequests: true}, func(c echo.Context) error {
				if fail {
					return c.String(http.StatusBadGateway, "upstream down") // written, not returned
				}
				return c.NoContent(http.StatusNoContent)
			})
			fail = true
			for range 5 {
				require.Equal(t, http.StatusBadGateway, s.do("192.0.2.8:1", nil).Code)
			}
			fail = false
			require.Equal(t, http.StatusNoContent, s.do("192.0.2.8:1", nil).Code)
			require.Equal(t, http.StatusNoContent, s.do("192.0.2.8:1", nil).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do("192.0.2.8:1", nil).Code)
		})
	})
}

// TestRateLimitClientKeys checks the default IP key: IPv6 grouping, and a
// spoofed X-Forwarded-For with and without a trusted proxy.
func TestRateLimitClientKeys(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		one := []Policy{{Limit: 1, Window: time.Hour}}
		cfg := func(name string) RateLimitConfig {
			return RateLimitConfig{Client: c, Options: Options{Prefix: r.Keys.Prefix()}, Name: name, Policies: one}
		}

		t.Run("IPv6 clients are grouped by /64", func(t *testing.T) {
			s := newRLServer(t, cfg("v6"), nil)
			require.Equal(t, http.StatusOK, s.do("[2001:db8:1:2::1]:1", nil).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do("[2001:db8:1:2:ffff:ffff:ffff:fffe]:1", nil).Code, "same /64")
			require.Equal(t, http.StatusOK, s.do("[2001:db8:1:3::1]:1", nil).Code, "next /64")
			require.Equal(t, http.StatusOK, s.do("[::ffff:192.0.2.1]:1", nil).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do("192.0.2.1:1", nil).Code, "an IPv4-mapped address is its IPv4 address")
			require.Equal(t, http.StatusOK, s.do("192.0.2.2:1", nil).Code, "IPv4 addresses count one by one")
		})
		t.Run("configurable prefix", func(t *testing.T) {
			k := cfg("v6-128")
			k.KeyFunc = IPKey(128)
			s := newRLServer(t, k, nil)
			require.Equal(t, http.StatusOK, s.do("[2001:db8::1]:1", nil).Code)
			require.Equal(t, http.StatusOK, s.do("[2001:db8::2]:1", nil).Code)
			k = cfg("v6-48")
			k.KeyFunc = IPKey(48)
			s = newRLServer(t, k, nil)
			require.Equal(t, http.StatusOK, s.do("[2001:db8:1:2::1]:1", nil).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do("[2001:db8:1:3::1]:1", nil).Code)
		})
		t.Run("X-Forwarded-For is ignored without a trusted proxy", func(t *testing.T) {
			s := newRLServer(t, cfg("direct"), nil)
			require.Equal(t, http.StatusOK, s.do("203.0.113.5:1", http.Header{"X-Forwarded-For": {"198.51.100.1"}}).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do("203.0.113.5:1", http.Header{"X-Forwarded-For": {"198.51.100.2"}}).Code,
				"a spoofed header does not buy a new quota")
		})
		t.Run("behind a trusted proxy, the proxy's entry counts", func(t *testing.T) {
			s := newRLServer(t, cfg("proxied"), nil)
			s.e.IPExtractor = echo.ExtractIPFromXFFHeader(echo.TrustLoopback(true), echo.TrustPrivateNet(false), echo.TrustLinkLocal(false))
			proxy := "127.0.0.1:5000"
			require.Equal(t, http.StatusOK, s.do(proxy, http.Header{"X-Forwarded-For": {"198.51.100.1"}}).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do(proxy, http.Header{"X-Forwarded-For": {"1.2.3.4, 198.51.100.1"}}).Code,
				"a client prepending a fake address is still itself")
			require.Equal(t, http.StatusOK, s.do(proxy, http.Header{"X-Forwarded-For": {"198.51.100.2"}}).Code, "another client behind the proxy")
			require.Equal(t, http.StatusOK, s.do("203.0.113.9:1", http.Header{"X-Forwarded-For": {"198.51.100.3"}}).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do("203.0.113.9:1", http.Header{"X-Forwarded-For": {"198.51.100.4"}}).Code,
				"an untrusted peer's header is ignored")
		})
		t.Run("per user, or per IP when anonymous", func(t *testing.T) {
			k := cfg("user")
			k.KeyFunc = UserOrIPKey(func(c echo.Context) string { return c.Request().Header.Get("X-User") }, 0)
			s := newRLServer(t, k, nil)
			require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", http.Header{"X-User": {"alice"}}).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do("192.0.2.2:1", http.Header{"X-User": {"alice"}}).Code, "alice from anywhere")
			require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", http.Header{"X-User": {"bob"}}).Code)
			require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", nil).Code, "anonymous counts by address")
			require.Equal(t, http.StatusTooManyRequests, s.do("192.0.2.1:1", nil).Code)
			require.Equal(t, http.StatusOK, s.do("192.0.2.3:1", http.Header{"X-User": {"ip:192.0.2.1"}}).Code, "a user ID cannot pose as an address")
		})
	})
}

// TestRateLimitTwoInstances runs the middleware on two apps with their own
// clients: they share one limit.
func TestRateLimitTwoInstances(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		mk := func() *rlServer {
			return newRLServer(t, RateLimitConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}, Policies: []Policy{{Algorithm: SlidingLog, Limit: 10, Window: time.Hour}}}, nil)
		}
		a, b := mk(), mk()
		ok := 0
		for i := range 30 {
			s := a
			if i%2 == 1 {
				s = b
			}
			if s.do("192.0.2.1:1", nil).Code == http.StatusOK {
				ok++
			}
		}
		require.Equal(t, 10, ok)
	})
}

// scriptCalls returns how many scripts the servers ran: the EVALSHA and
// EVAL calls of INFO commandstats, summed over addrs.
func scriptCalls(t *testing.T, addrs []string) int64 {
	t.Helper()
	var n float64
	for _, addr := range addrs {
		stats := commandStats(t, addr)
		n += stats["evalsha"][0] + stats["eval"][0]
	}
	return int64(n)
}

// TestRateLimitFreePath checks that a blocked key is denied from memory
// with no Redis command until its known retry time, and only where that
// is exact.
func TestRateLimitFreePath(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		clock := newFakeClock()
		c := r.Client()
		l := newTestLimiter(t, r, c, LimiterConfig{Options: Options{Clock: clock}, Policies: []Policy{{Algorithm: FixedWindow, Limit: 2, Window: time.Hour}}})
		s := newRLServer(t, RateLimitConfig{Limiter: l}, nil)
		require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", nil).Code)
		require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", nil).Code)
		first := s.do("192.0.2.1:1", nil)
		require.Equal(t, http.StatusTooManyRequests, first.Code, "denied by Redis")

		before := scriptCalls(t, r.addrs)
		for range 100 {
			rec := s.do("192.0.2.1:1", nil)
			require.Equal(t, http.StatusTooManyRequests, rec.Code)
			require.Equal(t, first.Header().Get(echo.HeaderRetryAfter), rec.Header().Get(echo.HeaderRetryAfter))
			require.Equal(t, first.Header().Get("RateLimit"), rec.Header().Get("RateLimit"), "the same headers")
			require.JSONEq(t, first.Body.String(), rec.Body.String())
		}
		require.Equal(t, before, scriptCalls(t, r.addrs), "no script ran while the key was blocked")
		d := allow(t, l, "192.0.2.1", 2)
		require.False(t, d.FromMemory, "another cost passes at another time: Redis decides")

		require.Equal(t, http.StatusOK, s.do("192.0.2.2:1", nil).Code, "other keys still go to Redis")
		require.Greater(t, scriptCalls(t, r.addrs), before) // 2 on a node that lacks the script: EVALSHA, EVAL
		require.False(t, allow(t, l, "192.0.2.1", 0).FromMemory, "a read (cost 0) asks Redis")

		clock.Advance(time.Hour)
		require.False(t, allow(t, l, "192.0.2.1", 1).FromMemory, "after the retry time Redis decides again")

		clock.Advance(59 * time.Minute) // the block stored now ends at Redis's window end
		require.NoError(t, l.Reset(context.Background(), "192.0.2.1"))
		require.True(t, allow(t, l, "192.0.2.1", 1).Allowed, "Reset lifts this instance's block")
	})
}

func TestRateLimitFreePathOffWhereUnsafe(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		one := []Policy{{Algorithm: FixedWindow, Limit: 1, Window: time.Hour}}
		for name, cfg := range map[string]RateLimitConfig{
			"refunds":     {SkipSuccessfulRequests: true, Policies: one},
			"costs":       {Cost: func(echo.Context) int64 { return 1 }, Policies: one},
			"plan limits": {PolicyFunc: func(echo.Context) []Policy { return one }},
		} {
			t.Run(name, func(t *testing.T) {
				cfg.Client, cfg.Prefix, cfg.Name = c, r.Keys.Prefix(), name
				s := newRLServer(t, cfg, func(c echo.Context) error { return c.NoContent(http.StatusForbidden) })
				s.do("192.0.2.1:1", nil)
				require.Equal(t, http.StatusTooManyRequests, s.do("192.0.2.1:1", nil).Code)
				before := scriptCalls(t, r.addrs)
				require.Equal(t, http.StatusTooManyRequests, s.do("192.0.2.1:1", nil).Code)
				require.Equal(t, before+1, scriptCalls(t, r.addrs), "denials still ask Redis")
			})
		}
	})
}

func TestBlockMapSweeps(t *testing.T) {
	clock := newFakeClock()
	m := &blockMap{clock: clock}
	for i := range 10 {
		m.put(strconv.Itoa(i), Decision{Cost: 1, RetryAfter: time.Minute}, m.generation(), clock.Now())
	}
	require.Equal(t, int64(10), m.n.Load())
	clock.Advance(time.Minute)
	m.put("fresh", Decision{Cost: 1, RetryAfter: time.Minute}, m.generation(), clock.Now())
	require.Equal(t, int64(1), m.n.Load(), "ended blocks were swept")
	_, ok := m.get("fresh", 1)
	require.True(t, ok)
	_, ok = m.get("fresh", 0)
	require.False(t, ok)
	m.put("no retry", Decision{Cost: 1}, m.generation(), clock.Now())
	_, ok = m.get("no retry", 1)
	require.False(t, ok, "a denial with no known end is not remembered")
}

// TestLimiterRedisDown stops Redis for real and checks each FailurePolicy,
// the breaker's part, and the recovery once Redis is back.
func TestLimiterRedisDown(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		clock := newFakeClock()
		c := f.Client()
		br := NewBreaker(BreakerConfig{Failures: 3, Cooldown: 2 * time.Second, Logger: discardLogger()})
		mk := func(name string, fp FailurePolicy, share float64) *Limiter {
			l, err := NewLimiter(LimiterConfig{Client: c, Name: name, Options: Options{Prefix: f.Keys.Prefix(), Timeout: 300 * time.Millisecond, Breaker: br, Clock: clock, Logger: discardLogger()},
				Policies: []Policy{{Algorithm: FixedWindow, Limit: 10, Window: time.Minute}}, OnRedisError: fp, FallbackShare: share})
			require.NoError(t, err)
			return l
		}
		open, closed, local := mk("open", FailOpen, 0), mk("closed", FailClosed, 0), mk("local", LocalFallback, 0.3)
		mw := func(l *Limiter) *rlServer { return newRLServer(t, RateLimitConfig{Limiter: l}, nil) }
		ctx := context.Background()
		for _, l := range []*Limiter{open, closed, local} {
			d, err := l.Allow(ctx, "k")
			require.NoError(t, err)
			require.False(t, d.Degraded)
		}

		f.Stop(t)
		d, err := open.Allow(ctx, "k")
		require.NoError(t, err)
		require.True(t, d.Allowed && d.Degraded, "FailOpen allows")
		_, err = closed.Allow(ctx, "k")
		require.ErrorIs(t, err, ErrLimiterUnavailable)
		rec := mw(closed).do("192.0.2.1:1", nil)
		require.Equal(t, http.StatusServiceUnavailable, rec.Code, "FailClosed is a 503, not a 429")
		require.JSONEq(t, `{"error":"Service temporarily unavailable, please try again later."}`, rec.Body.String())
		require.NotContains(t, rec.Body.String(), "refused")

		admitted := 0
		for range 10 {
			d, err := local.Allow(ctx, "k")
			require.NoError(t, err)
			require.True(t, d.Degraded)
			if d.Allowed {
				admitted++
			}
		}
		require.Equal(t, 3, admitted, "LocalFallback grants this instance its share (30% of 10), not the whole limit")
		rec = mw(local).do("192.0.2.1:1", nil)
		require.Equal(t, http.StatusOK, rec.Code, "another key has its own local share")
		require.Equal(t, "3", rec.Header().Get("X-RateLimit-Limit"), "headers show the local limit")
		require.True(t, br.AnyOpen(), "the breaker opened: no per-request wait for a dead Redis")
		require.Equal(t, http.StatusOK, mw(open).do("192.0.2.1:1", nil).Code)

		f.Start(t)
		require.Eventually(t, func() bool {
			d, err := closed.Allow(ctx, "k")
			return err == nil && !d.Degraded
		}, 20*time.Second, 100*time.Millisecond, "recovery is automatic")
		for _, l := range []*Limiter{open, local} {
			d, err := l.Allow(ctx, "k")
			require.NoError(t, err)
			require.False(t, d.Degraded)
			require.True(t, d.Allowed, "the restarted server starts empty")
		}
	})
}

// TestLocalFallbackAlgorithms checks the in-process limiter on its clock.
func TestLocalFallbackAlgorithms(t *testing.T) {
	for _, tc := range []struct {
		p     Policy
		share float64
		burst int // admitted back to back
		after time.Duration
		more  int // admitted after `after`
	}{
		{Policy{Algorithm: FixedWindow, Limit: 10, Window: time.Minute}, 0.5, 5, time.Minute, 5},
		{Policy{Algorithm: SlidingLog, Limit: 10, Window: time.Minute}, 0.5, 5, 30 * time.Second, 0},
		{Policy{Algorithm: SlidingWindow, Limit: 10, Window: time.Minute}, 0.5, 5, 2 * time.Minute, 5},
		{Policy{Algorithm: TokenBucket, Limit: 60, Window: time.Minute, Burst: 10}, 0.2, 2, 5 * time.Second, 1},
	} {
		t.Run(tc.p.Algorithm.String(), func(t *testing.T) {
			clock := newFakeClock()
			clock.Advance(time.Duration(1_700_000_000*time.Second) % time.Minute * -1) // align to a minute
			ll := &localLimiter{clock: clock, share: tc.share, keys: map[string]*localKey{}}
			pols, err := normalizePolicies([]Policy{tc.p})
			require.NoError(t, err)
			count := func() int {
				n := 0
				for range 100 {
					if d := ll.decide("k", 1, pols); d.Allowed {
						n++
					} else {
						require.Greater(t, d.RetryAfter, time.Duration(0))
					}
				}
				return n
			}
			require.Equal(t, tc.burst, count())
			clock.Advance(tc.after)
			require.Equal(t, tc.more, count())
		})
	}
}

// TestLimiterMemoryPerKey measures MEMORY USAGE of one key's state after a
// realistic load: 100 requests a minute, the limit reached.
func TestLimiterMemoryPerKey(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		for _, tc := range []struct {
			alg Algorithm
			max int64 // bytes, all the key's keys
		}{
			{SlidingWindow, 200},
			{FixedWindow, 200},
			{TokenBucket, 200},
			{SlidingLog, 2500},
		} {
			t.Run(tc.alg.String(), func(t *testing.T) {
				// A prefix as short as the default "redisecho:", so that the
				// figures are what production keys take.
				var rnd [3]byte
				_, _ = rand.Read(rnd[:])
				l, err := NewLimiter(LimiterConfig{Client: c, Options: Options{Prefix: "t:" + hex.EncodeToString(rnd[:]) + ":", Logger: discardLogger()},
					Policies: []Policy{{Algorithm: tc.alg, Limit: 100, Window: time.Minute}}, DisableFreePath: true})
				require.NoError(t, err)
				key := "203.0.113.77"
				t.Cleanup(func() { _ = l.Reset(context.Background(), key) })
				for range 120 {
					allow(t, l, key, 1)
				}
				var total int64
				for _, k := range l.keys(key) {
					n, err := c.Do(context.Background(), c.B().MemoryUsage().Key(k).Build()).AsInt64()
					if rueidis.IsRedisNil(err) {
						continue // the key's log, unused without a SlidingLog policy
					}
					require.NoError(t, err, "key %s", k)
					total += n
				}
				t.Logf("%s, 100 per minute: %d bytes per limited key", tc.alg, total)
				require.Greater(t, total, int64(0))
				require.LessOrEqual(t, total, tc.max)
			})
		}
	})
}

// TestLimiterReviewRegressions pins down bugs found in review.
func TestLimiterReviewRegressions(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		ctx := context.Background()

		t.Run("a call with shorter policies never cuts the TTL a longer one needs", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{})
			login := Policy{Algorithm: FixedWindow, Limit: 1, Window: 15 * time.Minute}
			burst := Policy{Algorithm: TokenBucket, Limit: 10, Window: time.Second}
			d, err := l.AllowPolicies(ctx, "k", 1, login)
			require.NoError(t, err)
			require.True(t, d.Allowed)
			d, err = l.AllowPolicies(ctx, "k", 1, burst)
			require.NoError(t, err)
			require.True(t, d.Allowed)
			ttl, err := c.Do(ctx, c.B().Pttl().Key(l.keys("k")[0]).Build()).AsInt64()
			require.NoError(t, err)
			require.Greater(t, ttl, (14 * time.Minute).Milliseconds())
			time.Sleep(150 * time.Millisecond)
			d, err = l.AllowPolicies(ctx, "k", 1, login)
			require.NoError(t, err)
			require.False(t, d.Allowed, "the 15-minute window still counts")
		})

		t.Run("a late token bucket refund gives back only what has not refilled", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: TokenBucket, Limit: 5, Window: time.Second, Burst: 1}}, DisableFreePath: true})
			a := allow(t, l, "k", 1)
			require.True(t, a.Allowed)
			time.Sleep(210 * time.Millisecond) // one emission interval: A's token is back
			require.True(t, allow(t, l, "k", 1).Allowed)
			require.NoError(t, l.Refund(ctx, &a))
			require.False(t, allow(t, l, "k", 1).Allowed, "B's token is not A's to give back")
		})

		t.Run("a decision is refunded once", func(t *testing.T) {
			for _, alg := range []Algorithm{SlidingWindow, FixedWindow, SlidingLog, TokenBucket} {
				l := newTestLimiter(t, r, c, LimiterConfig{Name: "once-" + alg.String(), Policies: []Policy{{Algorithm: alg, Limit: 2, Window: time.Hour}}, DisableFreePath: true})
				a := allow(t, l, "k", 1)
				allow(t, l, "k", 1)
				require.NoError(t, l.Refund(ctx, &a))
				require.NoError(t, l.Refund(ctx, &a))
				require.True(t, allow(t, l, "k", 1).Allowed, alg.String())
				require.False(t, allow(t, l, "k", 1).Allowed, "%s: the second refund gave nothing", alg)
			}
		})

		t.Run("a fresh bucket reports burst-1 left, for every rate", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{})
			for _, w := range []time.Duration{time.Second, time.Minute, time.Hour} {
				for limit := int64(1); limit <= 100; limit += 3 {
					key := strconv.FormatInt(limit, 10) + "/" + w.String()
					t0 := time.Now()
					d, err := l.AllowPolicies(ctx, key, 1, Policy{Algorithm: TokenBucket, Limit: limit, Window: w})
					require.NoError(t, err)
					require.Equal(t, limit-1, d.Remaining, "%d per %v", limit, w)
					d, err = l.AllowPolicies(ctx, key, limit-1, Policy{Algorithm: TokenBucket, Limit: limit, Window: w})
					require.NoError(t, err)
					require.True(t, d.Allowed, "%d per %v: the rest of the burst", limit, w)
					// Zero, plus what refilled meanwhile (100 per second
					// refills one every 10 ms: a loaded machine is that slow).
					refilled := int64(time.Since(t0).Seconds() * float64(limit) / w.Seconds())
					require.LessOrEqual(t, d.Remaining, refilled, "%d per %v", limit, w)
				}
			}
		})

		t.Run("Reset forgets per-request log policies too", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{})
			p := Policy{Algorithm: SlidingLog, Limit: 1, Window: time.Hour}
			_, err := l.AllowPolicies(ctx, "k", 1, p)
			require.NoError(t, err)
			require.NoError(t, l.Reset(ctx, "k"))
			d, err := l.AllowPolicies(ctx, "k", 1, p)
			require.NoError(t, err)
			require.True(t, d.Allowed)
		})

		t.Run("a denial reports the untouched remaining of the policies that passed", func(t *testing.T) {
			for _, alg := range []Algorithm{SlidingWindow, FixedWindow, SlidingLog, TokenBucket} {
				l := newTestLimiter(t, r, c, LimiterConfig{Name: "rem-" + alg.String(), Policies: []Policy{
					{Name: "burst", Algorithm: FixedWindow, Limit: 2, Window: 10 * time.Second},
					{Name: "big", Algorithm: alg, Limit: 100, Window: 24 * time.Hour},
				}, DisableFreePath: true})
				allow(t, l, "k", 1)
				allow(t, l, "k", 1)
				d := allow(t, l, "k", 1)
				require.False(t, d.Allowed)
				peek := allow(t, l, "k", 0)
				require.Equal(t, peek.Policies[1].Remaining, d.Policies[1].Remaining, alg.String())
				require.Equal(t, int64(98), d.Policies[1].Remaining, alg.String())
			}
		})

		t.Run("a peek is never denied", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{})
			_, err := l.AllowPolicies(ctx, "k", 3, Policy{Limit: 5, Window: time.Hour})
			require.NoError(t, err)
			d, err := l.AllowPolicies(ctx, "k", 0, Policy{Limit: 2, Window: time.Hour})
			require.NoError(t, err)
			require.True(t, d.Allowed, "a lowered limit leaves the key over it; reading is still allowed")
			require.Zero(t, d.Remaining)
		})

		t.Run("Next is the effective window", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{
				{Name: "bucket", Algorithm: TokenBucket, Limit: 10, Window: 10 * time.Second},
				{Name: "fixed", Algorithm: FixedWindow, Limit: 10, Window: time.Minute},
			}})
			d := allow(t, l, "k", 3)
			b, f := d.Policies[0], d.Policies[1]
			require.Equal(t, int64(7), b.Remaining)
			require.InDelta(t, float64(time.Second), float64(b.Next), float64(50*time.Millisecond), "one more token in one emission interval")
			require.InDelta(t, float64(3*time.Second), float64(b.Reset), float64(50*time.Millisecond), "whole again in three")
			require.InDelta(t, float64(time.Minute), float64(f.Next), float64(50*time.Millisecond), "a fixed window frees units at its end")
		})
	})
}

func TestLimiterKeysNeverCollide(t *testing.T) {
	l := must(NewLimiter(LimiterConfig{Client: standaloneClient(t), Name: "collide", Policies: []Policy{PerMinute(1)}}))
	long := strings.Repeat("x", 200)
	seen := map[string]string{}
	for _, k := range []string{long, "#" + Digest(long), "\x00" + Digest(long), "#:" + Digest(long), Digest(long)} {
		key := l.keys(normKey(k))[0]
		require.NotContains(t, seen, key, "%q and %q", seen[key], k)
		seen[key] = k
	}
	require.Less(t, len(l.keys(normKey(long))[0]), 100, "long keys are digested")
}

func TestLimiterValidationBounds(t *testing.T) {
	c := standaloneClient(t)
	for name, p := range map[string]Policy{
		"log above its cap":     {Algorithm: SlidingLog, Limit: MaxSlidingLogLimit + 1, Window: time.Hour},
		"bucket faster than µs": {Algorithm: TokenBucket, Limit: 2_000_000, Window: time.Second},
		"huge limit":            {Limit: 1 << 41, Window: time.Hour},
		"huge window":           {Limit: 1, Window: 36 * 365 * 24 * time.Hour},
	} {
		_, err := NewLimiter(LimiterConfig{Client: c, Name: name, Policies: []Policy{p}})
		require.ErrorIs(t, err, ErrInvalidLimiterConfig, name)
	}
	d := Decision{Allowed: true, Policies: []PolicyDecision{
		{Policy: Policy{Limit: 1 << 40}, Remaining: 1},
		{Policy: Policy{Limit: 1 << 40}, Remaining: 1 << 39},
	}}
	d.bind()
	require.Equal(t, int64(1), d.Remaining, "no overflow comparing shares")
}

func TestLocalFallbackBounds(t *testing.T) {
	clock := newFakeClock()
	ll := &localLimiter{clock: clock, share: 0.25, keys: map[string]*localKey{}}
	pols := must(normalizePolicies([]Policy{{Algorithm: SlidingLog, Limit: 10, Window: time.Minute}}))
	d := ll.decide("k", 5, pols)
	require.False(t, d.Allowed, "a cost above this instance's share is denied, not a panic")
	require.Empty(t, ll.keys, "denials create no state")

	bucket := must(normalizePolicies([]Policy{{Algorithm: TokenBucket, Limit: 1, Window: time.Second, Burst: 10}}))
	ll = &localLimiter{clock: clock, share: 1, keys: map[string]*localKey{}}
	for range 10 {
		require.True(t, ll.decide("b", 1, bucket).Allowed)
	}
	clock.Advance(2100 * time.Millisecond)
	ll.decide("other", 1, bucket) // sweeps
	n := 0
	for ll.decide("b", 1, bucket).Allowed {
		n++
	}
	require.Equal(t, 2, n, "the bucket's state outlived 2 windows: it refilled 2 tokens, not 10")

	sliding := must(normalizePolicies([]Policy{{Algorithm: SlidingWindow, Limit: 2, Window: time.Minute}}))
	ll = &localLimiter{clock: clock, share: 1, keys: map[string]*localKey{}}
	clock.Advance(time.Minute - time.Duration(clock.Now().UnixMicro()%time.Minute.Microseconds())*time.Microsecond + 50*time.Second)
	require.True(t, ll.decide("s", 1, sliding).Allowed)
	require.True(t, ll.decide("s", 1, sliding).Allowed)
	d = ll.decide("s", 1, sliding)
	require.False(t, d.Allowed)
	clock.Advance(d.RetryAfter)
	require.True(t, ll.decide("s", 1, sliding).Allowed, "admitted at RetryAfter")

	fixed := must(normalizePolicies([]Policy{{Algorithm: FixedWindow, Limit: 1, Window: time.Hour}}))
	ll = &localLimiter{clock: clock, share: 1, keys: map[string]*localKey{}}
	require.True(t, ll.decide("victim", 1, fixed).Allowed)
	for i := range maxLocalKeys + 10 {
		ll.decide(strconv.Itoa(i), 1, fixed)
	}
	require.LessOrEqual(t, len(ll.keys), maxLocalKeys)
	require.Greater(t, len(ll.keys), maxLocalKeys*8/10, "a flood evicts a sample, not everyone")

	ll = &localLimiter{clock: clock, share: 1, keys: map[string]*localKey{}}
	a := ll.decide("r", 1, fixed)
	require.False(t, ll.decide("r", 1, fixed).Allowed)
	ll.refund("r", 1, a.Policies, a.refund.tokens)
	require.True(t, ll.decide("r", 1, fixed).Allowed, "local refunds")
}

func TestRateLimitReviewRegressions(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		cfg := func(name string, p ...Policy) RateLimitConfig {
			return RateLimitConfig{Client: c, Options: Options{Prefix: r.Keys.Prefix()}, Name: name, Policies: p}
		}

		t.Run("two middlewares cannot share a Name with other policies", func(t *testing.T) {
			_, err := cfg("shared", PerMinute(100)).ToMiddleware()
			require.NoError(t, err)
			_, err = cfg("shared", PerMinute(100)).ToMiddleware()
			require.NoError(t, err, "the same policies may share counters on purpose")
			_, err = cfg("shared", PerMinute(3)).ToMiddleware()
			require.ErrorIs(t, err, ErrInvalidLimiterConfig)
		})

		t.Run("a refund survives a panicking handler", func(t *testing.T) {
			k := cfg("panic", Policy{Algorithm: FixedWindow, Limit: 2, Window: time.Hour})
			k.SkipFailedRequests = true
			s := newRLServer(t, k, func(echo.Context) error { panic("boom") })
			s.e.Logger.SetOutput(io.Discard)
			s.e.Use(middleware.Recover())
			for range 4 {
				require.Equal(t, http.StatusInternalServerError, s.do("192.0.2.1:1", nil).Code)
			}
		})

		t.Run("an empty plan is unlimited", func(t *testing.T) {
			k := cfg("plans")
			k.PolicyFunc = func(c echo.Context) []Policy {
				if c.Request().Header.Get("X-Plan") == "free" {
					return []Policy{{Algorithm: FixedWindow, Limit: 1, Window: time.Hour}}
				}
				return nil
			}
			s := newRLServer(t, k, nil)
			for range 3 {
				rec := s.do("192.0.2.1:1", nil)
				require.Equal(t, http.StatusOK, rec.Code)
				require.Empty(t, rec.Header().Get("RateLimit"))
			}
			require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", http.Header{"X-Plan": {"free"}}).Code)
			require.Equal(t, http.StatusTooManyRequests, s.do("192.0.2.1:1", http.Header{"X-Plan": {"free"}}).Code)
		})

		t.Run("no client address is a logged server fault", func(t *testing.T) {
			s := newRLServer(t, cfg("noaddr", PerMinute(1)), nil)
			s.e.IPExtractor = func(*http.Request) string { return "" }
			require.Equal(t, http.StatusInternalServerError, s.do("192.0.2.1:1", nil).Code)
		})

		t.Run("stacked limiters list all their policies; a 429 lists the refusing ones", func(t *testing.T) {
			outer, err := cfg("outer", Policy{Name: "outer", Limit: 100, Window: time.Minute}).ToMiddleware()
			require.NoError(t, err)
			s := newRLServer(t, cfg("inner", Policy{Name: "inner", Algorithm: FixedWindow, Limit: 1, Window: time.Minute}), nil)
			s.e.Pre(outer)
			rec := s.do("192.0.2.1:1", nil)
			require.Len(t, sfItems(t, rec.Header(), "RateLimit-Policy"), 2)
			require.Len(t, sfItems(t, rec.Header(), "RateLimit"), 2)
			rec = s.do("192.0.2.1:1", nil)
			require.Equal(t, http.StatusTooManyRequests, rec.Code)
			cur := sfItems(t, rec.Header(), "RateLimit")
			require.Len(t, cur, 1, "a 429 lists what refused it")
			require.Contains(t, cur, "inner")
			require.Len(t, sfItems(t, rec.Header(), "RateLimit-Policy"), 2)
			d, ok := GetRateLimit(s.e.NewContext(httptest.NewRequest(http.MethodGet, "/", nil), httptest.NewRecorder()))
			require.False(t, ok, "no decision outside a request")
			require.False(t, d.Allowed)
		})

		t.Run("the decision is in the context", func(t *testing.T) {
			var got Decision
			s := newRLServer(t, cfg("ctx", PerMinute(10)), func(c echo.Context) error {
				got, _ = GetRateLimit(c)
				return c.NoContent(http.StatusNoContent)
			})
			s.do("192.0.2.1:1", nil)
			require.True(t, got.Allowed)
			require.Equal(t, int64(9), got.Remaining)
		})
	})
}

func TestRateLimitPolicyAdvertised(t *testing.T) {
	for _, tc := range []struct {
		p    Policy
		q, w int64
	}{
		{Policy{Limit: 100, Window: time.Minute}, 100, 60},
		{Policy{Limit: 10, Window: 100 * time.Millisecond}, 100, 1},
		{Policy{Limit: 10, Window: 1500 * time.Millisecond}, 13, 2},
		{Policy{Algorithm: TokenBucket, Limit: 1, Window: time.Second, Burst: 10}, 10, 10},
		{Policy{Algorithm: TokenBucket, Limit: 60, Window: time.Minute, Burst: 1}, 1, 1},
	} {
		q, w := advertised(tc.p)
		require.Equal(t, []int64{tc.q, tc.w}, []int64{q, w}, "%+v", tc.p)
	}
}

// TestLimiterShortRequestDeadline checks that a request deadline shorter
// than the limiter's Timeout still gets the failure policy, not an error.
func TestLimiterShortRequestDeadline(t *testing.T) {
	forEachFaultTopology(t, shortRequestDeadline)
}

func shortRequestDeadline(t *testing.T, f *faultRedis) {
	admin := f.Client(func(o *rueidis.ClientOption) { o.DisableCache = true })
	// A Timeout far beyond the pause: only the request's own deadline can
	// tell the script it came too late.
	l, err := NewLimiter(LimiterConfig{Client: f.Client(), Options: Options{Prefix: f.Keys.Prefix(), Timeout: 10 * time.Second, Logger: discardLogger()},
		Policies: []Policy{PerMinute(10), {Algorithm: SlidingLog, Limit: 10, Window: time.Minute}}})
	require.NoError(t, err)
	allow(t, l, "k", 1)
	before := limiterState(t, admin, l, "k")
	scripts := scriptCalls(t, f.addrs)
	f.Pause(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	d, err := l.Allow(ctx, "k")
	require.NoError(t, err)
	require.True(t, d.Allowed && d.Degraded, "FailOpen applies")
	f.Resume(t)
	require.Positive(t, settledScriptCalls(t, f.addrs)-scripts, "Redis ran the late script")
	require.Equal(t, before, limiterState(t, admin, l, "k"), "past the request's deadline, it charged nothing")
	require.Equal(t, int64(9), allow(t, l, "k", 0).Remaining)
}

// TestLimiterRefundRacesBlock checks that a denial racing a refund never
// leaves a block the refund should have lifted.
func TestLimiterRefundRacesBlock(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) { refundRacesBlock(t, r) })
}

func refundRacesBlock(t *testing.T, r *testRedis) {
	l := newTestLimiter(t, r, r.Client(), LimiterConfig{Policies: []Policy{{Algorithm: FixedWindow, Limit: 1, Window: time.Hour}}})
	ctx := context.Background()
	for i := range 200 {
		key := strconv.Itoa(i)
		d := allow(t, l, key, 1)
		require.True(t, d.Allowed)
		var wg sync.WaitGroup
		var raced Decision
		wg.Go(func() { raced, _ = l.Allow(ctx, key) })
		wg.Go(func() { _ = l.Refund(ctx, &d) })
		wg.Wait()
		if raced.Allowed {
			continue // the refund came first and the racing request took the unit
		}
		next := allow(t, l, key, 1)
		require.False(t, next.FromMemory, "iteration %d: a stale block outlived the refund", i)
		require.True(t, next.Allowed, "iteration %d", i)
	}
}

// BenchmarkLimiterAllow measures one decision per algorithm from 32
// goroutines, and reports the script's cost inside Redis (usec_per_call of
// EVALSHA in INFO commandstats) and the commands it runs.
func BenchmarkLimiterAllow(b *testing.B) {
	r := newTestRedis(b, standaloneRedis.name, standaloneRedis.addrs)
	c := r.Client()
	for _, alg := range []Algorithm{SlidingWindow, FixedWindow, SlidingLog, TokenBucket} {
		b.Run(alg.String(), func(b *testing.B) {
			l, err := NewLimiter(LimiterConfig{Client: c, Name: "bench-" + alg.String(), Options: Options{Prefix: r.Keys.Prefix()},
				Policies: []Policy{{Algorithm: alg, Limit: MaxSlidingLogLimit, Window: time.Millisecond * 100}}})
			require.NoError(b, err)
			before := commandStats(b, standaloneRedis.addrs[0])
			b.SetParallelism(16)
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := l.Allow(context.Background(), "k"); err != nil {
						b.Error(err)
						return
					}
				}
			})
			after := commandStats(b, standaloneRedis.addrs[0])
			calls := after["evalsha"][0] - before["evalsha"][0]
			if calls > 0 {
				b.ReportMetric((after["evalsha"][1]-before["evalsha"][1])/calls, "redis-µs/op")
				var all float64
				for name, v := range after {
					if name != "info" {
						all += v[0] - before[name][0]
					}
				}
				b.ReportMetric(all/calls, "cmds/op")
			}
		})
	}
}

// commandStats returns INFO commandstats as name -> {calls, usec}.
func commandStats(tb testing.TB, addr string) map[string][2]float64 {
	v, err := respDo(addr, 2*time.Second, "INFO", "commandstats")
	require.NoError(tb, err)
	info, _ := v.(string)
	out := map[string][2]float64{}
	for line := range strings.SplitSeq(info, "\r\n") {
		name, rest, ok := strings.Cut(strings.TrimPrefix(line, "cmdstat_"), ":")
		if !ok || name == line {
			continue
		}
		var calls, usec float64
		for kv := range strings.SplitSeq(rest, ",") {
			k, val, _ := strings.Cut(kv, "=")
			f, _ := strconv.ParseFloat(val, 64)
			switch k {
			case "calls":
				calls = f
			case "usec":
				usec = f
			}
		}
		out[name] = [2]float64{calls, usec}
	}
	return out
}

// FuzzLimiterKeys: whatever two keys hold, a limiter stores them under
// different Redis keys, each key's hash and log share a slot, and the names
// stay short.
func FuzzLimiterKeys(f *testing.F) {
	for _, s := range []string{"", "a", "{", "}{", "a:b", "#x", "\x00x", strings.Repeat("k", 129), "2001:db8::/64"} {
		f.Add(s, s+"x")
	}
	l := &Limiter{b: &backend{}, name: "fuzz"}
	f.Fuzz(func(t *testing.T, a, b string) {
		if a == "" || b == "" {
			return
		}
		ka, kb := l.keys(normKey(a)), l.keys(normKey(b))
		if a != b && ka[0] == kb[0] {
			t.Fatalf("%q and %q share the key %q", a, b, ka[0])
		}
		for _, k := range [][]string{ka, kb} {
			if keySlot(k[0]) != keySlot(k[1]) {
				t.Fatalf("hash %q and log %q are in different slots", k[0], k[1])
			}
			if len(k[0]) > 3*128+64 {
				t.Fatalf("key of %d bytes", len(k[0]))
			}
		}
	})
}

// TestLimiterSecondReviewRegressions pins down bugs found in the second
// review.
func TestLimiterSecondReviewRegressions(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		ctx := context.Background()

		t.Run("the log keeps at most the largest log limit", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{})
			_, err := l.AllowPolicies(ctx, "k", 1, Policy{Algorithm: SlidingLog, Limit: 1, Window: time.Hour})
			require.NoError(t, err)
			short := Policy{Algorithm: SlidingLog, Limit: 5, Window: 50 * time.Millisecond}
			for end := time.Now().Add(600 * time.Millisecond); time.Now().Before(end); {
				_, err := l.AllowPolicies(ctx, "k", 1, short)
				require.NoError(t, err)
			}
			n, err := c.Do(ctx, c.B().Zcard().Key(l.keys("k")[1]).Build()).AsInt64()
			require.NoError(t, err)
			require.LessOrEqual(t, n, int64(5))
		})

		t.Run("a log outlives its entries even when its hash was evicted", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{})
			log := Policy{Algorithm: SlidingLog, Limit: 5, Window: 2 * time.Minute}
			_, err := l.AllowPolicies(ctx, "k", 1, log)
			require.NoError(t, err)
			keys := l.keys("k")
			require.NoError(t, c.Do(ctx, c.B().Del().Key(keys[0]).Build()).Error()) // as an eviction would
			_, err = l.AllowPolicies(ctx, "k", 1, Policy{Algorithm: FixedWindow, Limit: 100, Window: 10 * time.Minute})
			require.NoError(t, err)
			_, err = l.AllowPolicies(ctx, "k", 1, log)
			require.NoError(t, err)
			ttl, err := c.Do(ctx, c.B().Pttl().Key(keys[1]).Build()).AsInt64()
			require.NoError(t, err)
			require.GreaterOrEqual(t, ttl, (2*time.Minute).Milliseconds()-1000)
		})

		t.Run("a copy of a refunded decision refunds nothing", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: FixedWindow, Limit: 5, Window: time.Hour}}, DisableFreePath: true})
			for range 3 {
				allow(t, l, "k", 1)
			}
			d := allow(t, l, "k", 1)
			cp := d
			require.NoError(t, l.Refund(ctx, &cp))
			require.NoError(t, l.Refund(ctx, &d))
			require.Equal(t, int64(2), allow(t, l, "k", 0).Remaining)
		})

		t.Run("a log of 10,000 takes a cost of 10,000 and gives it back", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: SlidingLog, Limit: MaxSlidingLogLimit, Window: time.Hour}}, DisableFreePath: true})
			d := allow(t, l, "k", MaxSlidingLogLimit)
			require.True(t, d.Allowed)
			require.False(t, allow(t, l, "k", 1).Allowed)
			require.NoError(t, l.Refund(ctx, &d))
			require.Equal(t, int64(MaxSlidingLogLimit), allow(t, l, "k", 0).Remaining)
		})

		t.Run("a year-long window", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: FixedWindow, Limit: 1000, Window: 365 * 24 * time.Hour}}})
			d := allow(t, l, "k", 1)
			require.True(t, d.Allowed)
			require.Equal(t, int64(999), d.Remaining)
		})
	})
}

func TestLimiterNamesIgnorePolicyOrder(t *testing.T) {
	c := standaloneClient(t)
	a, b := PerMinute(10), Policy{Algorithm: FixedWindow, Limit: 100, Window: time.Hour}
	_, err := NewLimiter(LimiterConfig{Client: c, Name: "order", Policies: []Policy{a, b}})
	require.NoError(t, err)
	_, err = NewLimiter(LimiterConfig{Client: c, Name: "order", Policies: []Policy{b, a}})
	require.NoError(t, err)
}

func TestBlockMapKeepsItsOwnCopy(t *testing.T) {
	clock := newFakeClock()
	m := &blockMap{clock: clock}
	d := Decision{Cost: 1, RetryAfter: time.Minute, Policies: []PolicyDecision{{Remaining: 0, RetryAfter: time.Minute}}}
	m.put("k", d, m.generation(), clock.Now())
	d.Policies[0].Remaining = 99
	got, ok := m.get("k", 1)
	require.True(t, ok)
	require.Zero(t, got.Policies[0].Remaining)
}

func TestLocalFallbackNext(t *testing.T) {
	clock := newFakeClock()
	ll := &localLimiter{clock: clock, share: 1, keys: map[string]*localKey{}}
	for _, p := range []Policy{
		{Algorithm: FixedWindow, Limit: 10, Window: time.Minute},
		{Algorithm: SlidingWindow, Limit: 10, Window: time.Minute},
		{Algorithm: SlidingLog, Limit: 10, Window: time.Minute},
		{Algorithm: TokenBucket, Limit: 10, Window: time.Minute},
	} {
		pols := must(normalizePolicies([]Policy{p}))
		d := ll.decide(p.Algorithm.String(), 3, pols)
		require.True(t, d.Allowed)
		require.Equal(t, int64(7), d.Remaining, p.Algorithm.String())
		require.Greater(t, d.Policies[0].Next, time.Duration(0), "%s: the effective window", p.Algorithm)
		require.LessOrEqual(t, d.Policies[0].Next, 2*time.Minute, p.Algorithm.String())
	}
}

func TestRateLimitRouteKey(t *testing.T) {
	forEachTopology(t, routeKey)
}

func routeKey(t *testing.T, r *testRedis) {
	mw, err := RateLimitConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()}, Name: "routes",
		Policies: []Policy{{Algorithm: FixedWindow, Limit: 1, Window: time.Hour}}, KeyFunc: RouteKey(IPKey(0))}.ToMiddleware()
	require.NoError(t, err)
	e := echo.New()
	g := e.Group("", mw)
	ok := func(c echo.Context) error { return c.NoContent(http.StatusNoContent) }
	g.GET("/a/:id", ok)
	g.GET("/b", ok)
	do := func(path string) int {
		req := httptest.NewRequest(http.MethodGet, path, nil)
		req.RemoteAddr = "192.0.2.1:1"
		rec := httptest.NewRecorder()
		e.ServeHTTP(rec, req)
		return rec.Code
	}
	require.Equal(t, http.StatusNoContent, do("/a/1"))
	require.Equal(t, http.StatusTooManyRequests, do("/a/2"), "one route, whatever its parameters")
	require.Equal(t, http.StatusNoContent, do("/b"), "another route has its own quota")
}

func TestRateLimitFailClosedRetryAfter(t *testing.T) {
	forEachFaultTopology(t, failClosedRetryAfter)
}

func failClosedRetryAfter(t *testing.T, f *faultRedis) {
	br := NewBreaker(BreakerConfig{Failures: 1, Cooldown: 3 * time.Second, Logger: discardLogger()})
	s := newRLServer(t, RateLimitConfig{Client: f.Client(), Options: Options{Prefix: f.Keys.Prefix(), Breaker: br, Timeout: 200 * time.Millisecond},
		Policies: []Policy{PerMinute(10)}, OnRedisError: FailClosed}, nil)
	f.Stop(t)
	rec := s.do("192.0.2.1:1", nil)
	require.Equal(t, http.StatusServiceUnavailable, rec.Code)
	require.Equal(t, "3", rec.Header().Get(echo.HeaderRetryAfter), "ask again after the breaker's cool-down")
}

// TestLimiterThirdReviewRegressions pins down bugs found in the third
// review.
func TestLimiterThirdReviewRegressions(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		ctx := context.Background()

		t.Run("a bucket's remaining and next agree with what is stored", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: []Policy{{Algorithm: TokenBucket, Limit: 700, Window: time.Millisecond}}, DisableFreePath: true})
			for i := range 1500 {
				d := allow(t, l, "k", int64(1+i%150))
				if d.Allowed && d.Remaining < 700 {
					require.Greater(t, d.Policies[0].Next, time.Duration(0), "decision %d: %+v", i, d.Policies[0])
				}
			}
		})

		t.Run("a log survives the loss of its hash", func(t *testing.T) {
			l := newTestLimiter(t, r, c, LimiterConfig{})
			hourly := Policy{Algorithm: SlidingLog, Limit: 10, Window: time.Hour}
			for range 10 {
				_, err := l.AllowPolicies(ctx, "k", 1, hourly)
				require.NoError(t, err)
			}
			require.NoError(t, c.Do(ctx, c.B().Del().Key(l.keys("k")[0]).Build()).Error()) // as an eviction would
			_, err := l.AllowPolicies(ctx, "k", 1, Policy{Algorithm: SlidingLog, Limit: 2, Window: time.Millisecond})
			require.NoError(t, err)
			d, err := l.AllowPolicies(ctx, "k", 1, hourly)
			require.NoError(t, err)
			require.False(t, d.Allowed, "the hour's ten entries are still counted")
		})
	})
}

func TestLocalFallbackDenialConsumesNothing(t *testing.T) {
	clock := newFakeClock()
	ll := &localLimiter{clock: clock, share: 1, keys: map[string]*localKey{}}
	pols := must(normalizePolicies([]Policy{{Algorithm: SlidingLog, Limit: 10, Window: time.Minute}, {Algorithm: FixedWindow, Limit: 1, Window: time.Hour}}))
	require.True(t, ll.decide("k", 1, pols).Allowed)
	d := ll.decide("k", 1, pols)
	require.False(t, d.Allowed)
	require.Equal(t, int64(9), d.Policies[0].Remaining, "the log policy passed and was not charged")
	require.Equal(t, int64(9), ll.decide("k", 0, pols).Policies[0].Remaining)
}

// limiterState returns what Redis holds for key under l: its hash's fields
// and its log's members with their scores ("log:<member>").
func limiterState(t *testing.T, admin rueidis.Client, l *Limiter, key string) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	keys := l.keys(normKey(key))
	st, err := admin.Do(ctx, admin.B().Hgetall().Key(keys[0]).Build()).AsStrMap()
	require.NoError(t, err)
	log, err := admin.Do(ctx, admin.B().Zrange().Key(keys[1]).Min("0").Max("-1").Withscores().Build()).AsZScores()
	require.NoError(t, err)
	for _, z := range log {
		st["log:"+z.Member] = strconv.FormatFloat(z.Score, 'f', 0, 64)
	}
	return st
}

// TestLimiterPausedRedisChargesNothing is issue 10's paused login: correct
// logins while Redis is frozen (SIGSTOP) get each failure policy's answer;
// rueidis keeps their timed-out scripts queued and Redis runs them when it
// resumes, after their deadline, so they charge nothing and the next
// correct login passes. Under LocalFallback the paused logins were counted
// locally only, never in Redis as well.
func TestLimiterPausedRedisChargesNothing(t *testing.T) {
	forEachFaultTopology(t, pausedRedisChargesNothing)
}

func pausedRedisChargesNothing(t *testing.T, f *faultRedis) {
	const client, paused = "192.0.2.1:1", 6
	c := f.Client()
	admin := f.Client(func(o *rueidis.ClientOption) { o.DisableCache = true })
	// A breaker that never opens: every paused login is sent, and queued.
	br := NewBreaker(BreakerConfig{Failures: 1000, Logger: discardLogger()})
	pols := []Policy{{Algorithm: FixedWindow, Limit: 5, Window: 15 * time.Minute}, {Algorithm: SlidingLog, Limit: 10, Window: time.Minute}}
	logins := []struct {
		fp     FailurePolicy
		paused int // a correct login's status while Redis is paused
		s      *rlServer
		l      *Limiter
		before map[string]string
	}{
		{fp: FailOpen, paused: http.StatusOK},
		{fp: FailClosed, paused: http.StatusServiceUnavailable},
		{fp: LocalFallback, paused: http.StatusOK},
	}
	for i := range logins {
		lg := &logins[i]
		l, err := NewLimiter(LimiterConfig{Client: c, Name: "login-" + lg.fp.String(), Policies: pols,
			Options:      Options{Prefix: f.Keys.Prefix(), Timeout: 150 * time.Millisecond, Breaker: br, Logger: discardLogger()},
			OnRedisError: lg.fp, FallbackShare: 1, DisableFreePath: true})
		require.NoError(t, err)
		lg.l, lg.s = l, newRLServer(t, RateLimitConfig{Limiter: l, SkipSuccessfulRequests: true}, nil)
		rec := lg.s.do(client, nil)
		require.Equal(t, http.StatusOK, rec.Code, "a correct login, counted then refunded")
		require.Equal(t, "4", rec.Header().Get("X-RateLimit-Remaining"))
		lg.before = limiterState(t, admin, l, "192.0.2.1")
		require.NotEmpty(t, lg.before)
	}
	for _, lg := range logins {
		scripts := scriptCalls(t, f.addrs)
		f.Pause(t)
		for range paused {
			require.Equal(t, lg.paused, lg.s.do(client, nil).Code, "%s while Redis is paused", lg.fp)
		}
		f.Resume(t)
		// rueidis sent the timed-out scripts (some on connections it then
		// closed): Redis runs what it received when it resumes.
		ran := settledScriptCalls(t, f.addrs) - scripts
		require.Positive(t, ran, "%s: Redis ran late scripts", lg.fp)
		t.Logf("%s: %d of %d paused decisions reached Redis late", lg.fp, ran, paused)

		require.Equal(t, lg.before, limiterState(t, admin, lg.l, "192.0.2.1"), "%s: the late scripts charged nothing", lg.fp)
		rec := lg.s.do(client, nil)
		require.Equal(t, http.StatusOK, rec.Code, "%s: the next correct login passes", lg.fp)
		require.Equal(t, "4", rec.Header().Get("X-RateLimit-Remaining"), "%s: and sees only itself counted", lg.fp)
		d := allow(t, lg.l, "192.0.2.1", 0)
		require.False(t, d.Degraded)
		require.Equal(t, int64(5), d.Remaining, "%s: the login was refunded in Redis, once", lg.fp)
	}
}

// settledScriptCalls returns scriptCalls once it has stopped growing: the
// scripts a resumed server found waiting have run.
func settledScriptCalls(t *testing.T, addrs []string) int64 {
	t.Helper()
	last, same := scriptCalls(t, addrs), 0
	for same < 5 {
		time.Sleep(50 * time.Millisecond)
		n := scriptCalls(t, addrs)
		if n == last {
			same++
		} else {
			last, same = n, 0
		}
	}
	return last
}

// skewClock shifts the offset l has learnt for key's node by delta, once
// it is known (on a cluster, once the slot map is loaded).
func skewClock(t *testing.T, l *Limiter, key string, delta time.Duration) {
	t.Helper()
	var nc *nodeClock
	require.Eventually(t, func() bool {
		v, ok := l.clocks.nodes.Load(l.b.scope(l.keys(normKey(key))[0]))
		if !ok {
			allow(t, l, key, 0) // learns the node's clock
			return false
		}
		nc = v.(*nodeClock)
		return true
	}, 10*time.Second, 10*time.Millisecond, "the node's clock is known")
	cs := *nc.cur.Load()
	cs.offset += delta.Microseconds()
	nc.cur.Store(&cs)
}

// TestLimiterLateCallsChangeNothing checks the late path without a pause:
// a script whose deadline has passed in Redis time, as a decision or a
// refund that waited in a queue would find it, changes nothing; the caller
// applies its failure policy (or gets an error to retry a refund with),
// and the reply's time puts the clock right for the next call.
func TestLimiterLateCallsChangeNothing(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		admin := r.Client(func(o *rueidis.ClientOption) { o.DisableCache = true })
		ctx := context.Background()
		pols := []Policy{{Algorithm: FixedWindow, Limit: 5, Window: time.Hour}, {Algorithm: SlidingLog, Limit: 5, Window: time.Hour},
			{Algorithm: SlidingWindow, Limit: 5, Window: 2 * time.Hour}, {Algorithm: TokenBucket, Limit: 5, Window: 3 * time.Hour}}

		t.Run("script", func(t *testing.T) {
			keys := newTestLimiter(t, r, c, LimiterConfig{Policies: pols}).keys("late")
			args := append([]string{"1", "1", strconv.Itoa(len(pols))}, policyArgs(pols)...) // deadline: 1 µs after the epoch
			reply, err := limitScript.Exec(ctx, c, keys, args).AsIntSlice()
			require.NoError(t, err)
			require.Len(t, reply, 2)
			require.Equal(t, int64(-1), reply[0], "late")
			require.Greater(t, reply[1], time.Now().Add(-time.Hour).UnixMicro(), "the reply carries Redis TIME")
			n, err := admin.Do(ctx, admin.B().Exists().Key(keys...).Build()).AsInt64()
			require.NoError(t, err)
			require.Zero(t, n, "nothing written")
		})

		t.Run("each node its own clock", func(t *testing.T) {
			if c.Mode() != rueidis.ClientModeCluster {
				t.Skip("one node")
			}
			l := newTestLimiter(t, r, c, LimiterConfig{Policies: pols, OnRedisError: FailClosed, DisableFreePath: true})
			skewClock(t, l, "a", -time.Hour)
			scopeOf := func(key string) string { return l.b.scope(l.keys(normKey(key))[0]) }
			other := ""
			for i := 0; other == ""; i++ {
				require.Less(t, i, 1000)
				if k := "b" + strconv.Itoa(i); scopeOf(k) != scopeOf("a") {
					other = k
				}
			}
			d, err := l.Allow(ctx, other)
			require.NoError(t, err, "another master's deadline is not the skewed node's")
			require.False(t, d.Degraded)
			_, err = l.Allow(ctx, "a")
			require.ErrorIs(t, err, errLate, "the skewed node's is")
		})

		for _, fp := range []FailurePolicy{FailOpen, FailClosed, LocalFallback} {
			t.Run(fp.String(), func(t *testing.T) {
				l := newTestLimiter(t, r, c, LimiterConfig{Policies: pols, OnRedisError: fp, FallbackShare: 1, DisableFreePath: true})
				first := allow(t, l, "k", 1)
				require.True(t, first.Allowed && !first.Degraded)
				before := limiterState(t, admin, l, "k")

				skewClock(t, l, "k", -time.Hour) // deadlines now lie an hour in the node's past
				d, err := l.Allow(ctx, "k")
				switch fp {
				case FailClosed:
					require.ErrorIs(t, err, ErrLimiterUnavailable)
					require.ErrorIs(t, err, errLate)
				default:
					require.NoError(t, err)
					require.True(t, d.Allowed && d.Degraded, "the failure policy decides")
				}
				if fp == LocalFallback {
					require.Equal(t, int64(4), d.Remaining, "counted locally")
				}
				require.Equal(t, before, limiterState(t, admin, l, "k"), "the late decision charged nothing: never counted twice")

				d = allow(t, l, "k", 1)
				require.False(t, d.Degraded, "the late reply's time set the clock right")
				require.Equal(t, int64(3), d.Remaining)

				before = limiterState(t, admin, l, "k")
				skewClock(t, l, "k", -time.Hour)
				require.ErrorIs(t, l.Refund(ctx, &d), errLate)
				require.Equal(t, before, limiterState(t, admin, l, "k"), "the late refund gave nothing back")
				require.NoError(t, l.Refund(ctx, &d), "a late refund may be tried again")
				require.NoError(t, l.Refund(ctx, &d), "and then counts once")
				require.Equal(t, int64(4), allow(t, l, "k", 0).Remaining)
			})
		}
	})
}

// TestLimiterLearnsEachNodesClock checks the first call to a node: before
// any reply is known, one TIME round trip learns the node's clock, so that
// even the first decision carries a deadline; later calls learn from their
// replies and cost one script (two TIME reads: the first call's own and its
// script's; then one).
func TestLimiterLearnsEachNodesClock(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		l, err := NewLimiter(LimiterConfig{Client: f.Client(), Options: Options{Prefix: f.Keys.Prefix(), Logger: discardLogger()}, Policies: []Policy{PerMinute(100)}})
		require.NoError(t, err)
		timeCalls := func() (n float64) {
			for _, addr := range f.addrs {
				n += commandStats(t, addr)["time"][0]
			}
			return n
		}
		before := timeCalls()
		allow(t, l, "k", 1)
		require.Equal(t, before+2, timeCalls(), "the first call learns the node's clock first")
		require.Eventually(t, func() bool {
			before := timeCalls()
			allow(t, l, "k", 1)
			return timeCalls() == before+1
		}, 10*time.Second, 50*time.Millisecond, "later calls learn from their replies (on a cluster, once the slot map is known)")
	})
}

// TestRedisClocks checks the offset arithmetic: a reply's time is a lower
// bound of the node's clock at its arrival; each node has its own; a
// deadline loses clockDrift per second of the offset's age; an offset too
// old is not used; the tightest bound is kept until the node's clock
// steps back.
func TestRedisClocks(t *testing.T) {
	base := time.Now()
	c := redisClocks{base: base, timeout: 500 * time.Millisecond}
	at := func(d time.Duration) time.Time { return base.Add(d) }
	_, ok := c.redisTime("10.0.0.1:6379", at(time.Second))
	require.False(t, ok, "nothing known before a reply")

	// Node A is 1 h ahead of us; node B 3 s behind. Replies arrive 10 s in.
	require.Equal(t, int64(3600e6), c.learn("A", (10*time.Second+time.Hour).Microseconds(), at(10*time.Second)))
	c.learn("B", (7 * time.Second).Microseconds(), at(10*time.Second))

	for _, tc := range []struct {
		name  string
		scope string
		local time.Duration // the local deadline, since base
		want  int64         // µs of the node's clock
		ok    bool
	}{
		{"A, fresh", "A", 10 * time.Second, (10*time.Second + time.Hour).Microseconds(), true},
		{"B, fresh", "B", 10 * time.Second, (7 * time.Second).Microseconds(), true},
		{"A, 10 s old: 10 ms of drift off", "A", 20 * time.Second, (20*time.Second + time.Hour - 10*time.Millisecond).Microseconds(), true},
		{"B, 50 s old: 50 ms off", "B", 60 * time.Second, (57*time.Second - 50*time.Millisecond).Microseconds(), true},
		{"B, older than 100 timeouts", "B", 61 * time.Second, 0, false},
		{"a deadline before the reply", "B", 9 * time.Second, (6 * time.Second).Microseconds(), true},
		{"unknown node", "C", 10 * time.Second, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := c.redisTime(tc.scope, at(tc.local))
			require.Equal(t, tc.ok, ok)
			require.Equal(t, tc.want, got)
		})
	}

	// A looser bound (a slower reply) does not replace a tighter one for
	// clockKeep: A, learnt again at 30 s, 0.5 s later.
	c.learn("A", (30*time.Second + time.Hour).Microseconds(), at(30*time.Second))
	later := at(30*time.Second + 500*time.Millisecond)
	sample := func(redis time.Duration, recv time.Time) int64 {
		c.learn("A", redis.Microseconds(), recv)
		got, ok := c.redisTime("A", recv)
		require.True(t, ok)
		return got
	}
	require.Equal(t, (30*time.Second+time.Hour+500*time.Millisecond).Microseconds()-500, sample(30*time.Second+time.Hour+400*time.Millisecond, later), "kept, aged 0.5 ms")
	require.Equal(t, (30*time.Second + time.Hour + 499900*time.Microsecond).Microseconds(), sample(30*time.Second+time.Hour+499900*time.Microsecond, later), "a tighter one replaces it")
	require.Equal(t, (30*time.Second + 500*time.Millisecond).Microseconds(), sample(30*time.Second+500*time.Millisecond, later), "so does one lower by more than a Timeout: the node's clock stepped back")
	past := later.Add(clockKeep + time.Millisecond)
	require.Equal(t, (31*time.Second + 400*time.Millisecond).Microseconds(), sample(31*time.Second+400*time.Millisecond, past), "and any one after clockKeep: a small step back shows within it")
	// An offset too old for use is replaced by any new one.
	c.learn("B", (100 * time.Second).Microseconds(), at(100*time.Second))
	got, ok := c.redisTime("B", at(100*time.Second))
	require.True(t, ok)
	require.Equal(t, (100 * time.Second).Microseconds(), got)
}

// TestLimiterOutOfMemory fills Redis (maxmemory, noeviction): an admission
// needs writes, and a full Redis refuses its first one, so nothing is
// written (with a SlidingLog too, whose trim used to come first and let the
// rest write into a full Redis) and the failure policy answers; denials
// and reads write nothing and are still decided by Redis; refunds only
// shrink state and succeed. Once memory is freed, admissions work again.
func TestLimiterOutOfMemory(t *testing.T) {
	forEachFaultTopology(t, limiterOutOfMemory)
}

func limiterOutOfMemory(t *testing.T, f *faultRedis) {
	ctx := context.Background()
	c := f.Client()
	admin := f.Client(func(o *rueidis.ClientOption) { o.DisableCache = true })
	pols := []Policy{{Algorithm: SlidingLog, Limit: 3, Window: time.Minute}, {Algorithm: SlidingWindow, Limit: 3, Window: time.Hour},
		{Algorithm: FixedWindow, Limit: 3, Window: 2 * time.Hour}, {Algorithm: TokenBucket, Limit: 3, Window: 3 * time.Hour}}
	type limiter struct {
		fp   FailurePolicy
		l    *Limiter
		used Decision // admitted before Redis filled up
		// admitted under counters alone, whose refund's first real write
		// is an HSET (deny-OOM): it passes only after the no-op HDEL
		counted Decision
	}
	counters := []Policy{{Algorithm: FixedWindow, Limit: 3, Window: 2 * time.Hour}, {Algorithm: SlidingWindow, Limit: 3, Window: time.Hour}}
	var ls []*limiter
	for _, fp := range []FailurePolicy{FailOpen, FailClosed, LocalFallback} {
		l, err := NewLimiter(LimiterConfig{Client: c, Name: "oom-" + fp.String(), Policies: pols, OnRedisError: fp, FallbackShare: 1, DisableFreePath: true,
			Options: Options{Prefix: f.Keys.Prefix(), Logger: discardLogger()}})
		require.NoError(t, err)
		lm := &limiter{fp: fp, l: l, used: allow(t, l, "used", 1)}
		lm.counted, err = l.AllowPolicies(ctx, "counted", 1, counters...)
		require.NoError(t, err)
		require.True(t, lm.counted.Allowed && !lm.counted.Degraded)
		for range 3 {
			require.True(t, allow(t, l, "full", 1).Allowed)
		}
		require.False(t, allow(t, l, "full", 1).Allowed)
		ls = append(ls, lm)
	}

	f.Fill(t)
	for _, lm := range ls {
		l := lm.l
		for _, key := range []string{"used", "new"} {
			before := limiterState(t, admin, l, key)
			d, err := l.Allow(ctx, key)
			if lm.fp == FailClosed {
				require.ErrorIs(t, err, ErrLimiterUnavailable)
				require.ErrorContains(t, err, "OOM")
			} else {
				require.NoError(t, err)
				require.True(t, d.Allowed && d.Degraded, "%s answers, without Redis", lm.fp)
			}
			require.Equal(t, before, limiterState(t, admin, l, key), "%s, %s: nothing written", lm.fp, key)
		}
		require.Empty(t, limiterState(t, admin, l, "new"))

		d := allow(t, l, "full", 1)
		require.True(t, !d.Allowed && !d.Degraded, "%s: a denial is decided by Redis", lm.fp)
		require.Positive(t, d.RetryAfter)
		d = allow(t, l, "used", 0)
		require.True(t, d.Allowed && !d.Degraded, "%s: a read is decided by Redis", lm.fp)
		require.Equal(t, int64(2), d.Remaining)

		require.NoError(t, l.Refund(ctx, &lm.used), "%s: a refund only shrinks state, and succeeds", lm.fp)
		require.Equal(t, int64(3), allow(t, l, "used", 0).Remaining)
		require.NoError(t, l.Refund(ctx, &lm.counted), "%s: so does one that starts with a counter's HSET", lm.fp)
		d, err := l.AllowPolicies(ctx, "counted", 0, counters...)
		require.NoError(t, err)
		require.Equal(t, int64(3), d.Remaining)
	}
	require.False(t, BreakerFor(c).AnyOpen(), "OOM replies are answers: the shared breaker stays closed")

	f.Free(t)
	for _, lm := range ls {
		d := allow(t, lm.l, "new", 1)
		require.True(t, d.Allowed && !d.Degraded, "%s: admissions work again once memory is freed", lm.fp)
		require.NotEmpty(t, limiterState(t, admin, lm.l, "new"))
	}
}

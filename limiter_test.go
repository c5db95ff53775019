package redisecho

import (
	"context"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// newTestLimiter returns a limiter on client under r's prefix.
func newTestLimiter(t *testing.T, r *testRedis, client rueidis.Client, cfg LimiterConfig) *Limiter {
	t.Helper()
	cfg.Client = client
	cfg.Prefix = r.Keys.Prefix()
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
		log := l.keys("k", l.policies)[1]
		n, err := c.Do(context.Background(), c.B().Zcard().Key(log).Build()).AsInt64()
		require.NoError(t, err)
		require.Equal(t, int64(3), n, "the log recorded admitted requests only")

		// The bucket (1 left) denies a cost of 2 that the others would admit.
		require.NoError(t, l.Reset(context.Background(), "k"))
		allow(t, l, "k", 3)
		d := allow(t, l, "k", 0)
		require.Equal(t, []int64{0, 2, 1, 3}, remainings(d))

		t.Run("under concurrency", func(t *testing.T) {
			l2 := newTestLimiter(t, r, r.Client(), LimiterConfig{Policies: l.policies})
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
						tokens = append(tokens, d.tokens[0])
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
				require.NoError(t, l.Refund(ctx, denied), "refunding a denial is a no-op")
				require.False(t, allow(t, l, "k", 1).Allowed)

				require.NoError(t, l.Refund(ctx, ds[1]))
				d := allow(t, l, "k", 1)
				require.True(t, d.Allowed, "the refunded unit is back")
				require.Zero(t, d.Remaining)

				require.NoError(t, l.Refund(ctx, ds[0]))
				require.NoError(t, l.Refund(ctx, ds[2]))
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
			ks := l.keys(k, l.policies)
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

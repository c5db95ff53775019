package redisecho

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/stretchr/testify/require"
)

// The rate limiter's observations (ObsLimitDecision) and Limiter.Stats.

// decisions sums the ObsLimitDecision observations with result res and path
// p, of the policy name ("" for any).
func decisions(rec *recorder, res Result, p Path, name string) int64 {
	return rec.countWhere(func(k obsKey) bool {
		return k.Kind == ObsLimitDecision && k.Result == res && k.Path == p && (name == "" || k.Name == name)
	})
}

// requireOnePerDecision checks that every ObsLimitDecision counts one
// decision, and that there are want of them.
func requireOnePerDecision(t *testing.T, rec *recorder, want int) {
	t.Helper()
	obs := rec.of(ObsLimitDecision)
	require.Len(t, obs, want, "one observation per decision\n%s", rec.dump())
	for _, o := range obs {
		require.Equal(t, int64(1), o.N)
		require.Zero(t, o.Size)
		require.Zero(t, o.Duration)
	}
}

// get sends GET path from remote through e.
func get(e *echo.Echo, path, remote string) int {
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.RemoteAddr = remote
	rec := httptest.NewRecorder()
	e.ServeHTTP(rec, req)
	return rec.Code
}

// TestObserveLimitDecisions sends limit+k requests of one client through
// the middleware: limit are allowed by Redis, the first denial comes from
// Redis and the others from the free path; with the free path off every
// denial comes from Redis. Stats counts the same with or without an
// observer, and calls that decide nothing count nowhere.
func TestObserveLimitDecisions(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		const limit, extra = 3, 4
		c := r.Client()
		for _, tc := range []struct {
			name     string
			observed bool
			noFree   bool
		}{{"free path", true, false}, {"no free path", true, true}, {"no observer", false, false}} {
			t.Run(tc.name, func(t *testing.T) {
				rec := newRecorder()
				var obs Observer
				if tc.observed {
					obs = rec
				}
				l := newTestLimiter(t, r, c, LimiterConfig{Options: Options{Observer: obs}, DisableFreePath: tc.noFree,
					Policies: []Policy{{Algorithm: FixedWindow, Limit: limit, Window: time.Hour}}})
				name := l.Policies()[0].Name
				require.Equal(t, "3-per-1h-fixed-window", name, "the policy's default name")
				s := newRLServer(t, RateLimitConfig{Limiter: l}, nil)
				for i := range limit + extra {
					want := http.StatusOK
					if i >= limit {
						want = http.StatusTooManyRequests
					}
					require.Equal(t, want, s.do("192.0.2.1:1", nil).Code, "request %d", i)
				}

				fromMemory := int64(extra - 1) // the first denial is Redis's, and starts the block
				if tc.noFree {
					fromMemory = 0
				}
				require.Equal(t, LimiterStats{Allowed: limit, Denied: extra, FromMemory: fromMemory}, l.Stats())
				if !tc.observed {
					require.Empty(t, rec.of(ObsLimitDecision))
					return
				}
				requireOnePerDecision(t, rec, limit+extra)
				require.Equal(t, int64(limit), decisions(rec, ResultAllowed, PathRedis, name), rec.dump())
				require.Equal(t, int64(extra)-fromMemory, decisions(rec, ResultDenied, PathRedis, name), rec.dump())
				require.Equal(t, fromMemory, decisions(rec, ResultDenied, PathLocal, name), rec.dump())
				require.Equal(t, int64(limit+extra), rec.countNamed(ObsLimitDecision, ResultNone, name), "every decision is named after the policy")

				// Calls that decide nothing count nowhere.
				ctx := context.Background()
				_, err := l.AllowN(ctx, "192.0.2.9", limit+1)
				require.ErrorIs(t, err, ErrCostTooHigh)
				_, err = l.Allow(ctx, "")
				require.ErrorIs(t, err, ErrInvalidLimiterKey)
				cctx, cancel := context.WithCancel(ctx)
				cancel()
				_, err = l.Allow(cctx, "192.0.2.9")
				require.ErrorIs(t, err, context.Canceled)
				require.Len(t, rec.of(ObsLimitDecision), limit+extra)
				require.Equal(t, LimiterStats{Allowed: limit, Denied: extra, FromMemory: fromMemory}, l.Stats())

				// A read (cost 0) is an allowed decision of Redis's.
				d, err := l.AllowN(ctx, "192.0.2.1", 0)
				require.NoError(t, err)
				require.True(t, d.Allowed)
				require.Equal(t, int64(limit+1), decisions(rec, ResultAllowed, PathRedis, name))
				require.Equal(t, int64(limit+1), l.Stats().Allowed)
			})
		}
	})
}

// TestObserveLimitPolicyNames checks the Name of the decisions: two
// middlewares with policies of their own count apart; a limiter of several
// policies names its binding one; per-request policies (PolicyFunc) are
// named too.
func TestObserveLimitPolicyNames(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		rec := newRecorder()
		mk := func(name string, pols ...Policy) *Limiter {
			return newTestLimiter(t, r, c, LimiterConfig{Name: name, Options: Options{Observer: rec}, Policies: pols})
		}
		login := mk("login", Policy{Name: "login", Algorithm: FixedWindow, Limit: 2, Window: time.Hour})
		api := mk("api", Policy{Name: "api", Limit: 5, Window: time.Hour})
		// "tight" binds every decision: it has the smaller share left, and
		// it is the one that refuses.
		both := mk("both", Policy{Name: "wide", Algorithm: FixedWindow, Limit: 100, Window: time.Minute},
			Policy{Name: "tight", Limit: 2, Window: time.Hour})
		plan, err := RateLimitConfig{Client: c, Options: Options{Prefix: r.Keys.Prefix(), Observer: rec, Logger: discardLogger()}, Name: t.Name() + "plan",
			PolicyFunc: func(echo.Context) []Policy {
				return []Policy{{Name: "plan-free", Algorithm: FixedWindow, Limit: 1, Window: time.Hour}}
			}}.ToMiddleware()
		require.NoError(t, err)

		e := echo.New()
		h := func(c echo.Context) error { return c.NoContent(http.StatusOK) }
		e.GET("/login", h, RateLimitWithConfig(RateLimitConfig{Limiter: login}))
		e.GET("/api", h, RateLimitWithConfig(RateLimitConfig{Limiter: api}))
		e.GET("/both", h, RateLimitWithConfig(RateLimitConfig{Limiter: both}))
		e.GET("/plan", h, plan)
		send := func(path string, n, allowed int) {
			t.Helper()
			for i := range n {
				want := http.StatusOK
				if i >= allowed {
					want = http.StatusTooManyRequests
				}
				require.Equal(t, want, get(e, path, "192.0.2.1:1"), "%s request %d", path, i)
			}
		}
		send("/login", 4, 2)
		send("/api", 7, 5)
		send("/both", 5, 2)
		send("/plan", 3, 1)
		requireOnePerDecision(t, rec, 4+7+5+3)

		for _, tc := range []struct {
			name                    string
			allowed, denied, memory int64
			l                       *Limiter // nil: the middleware's own
		}{
			{"login", 2, 2, 1, login},
			{"api", 5, 2, 1, api},
			{"tight", 2, 3, 2, both},
			{"plan-free", 1, 2, 0, nil}, // PolicyFunc turns the free path off
		} {
			require.Equal(t, tc.allowed, decisions(rec, ResultAllowed, PathRedis, tc.name), "%s\n%s", tc.name, rec.dump())
			require.Equal(t, tc.denied-tc.memory, decisions(rec, ResultDenied, PathRedis, tc.name), "%s\n%s", tc.name, rec.dump())
			require.Equal(t, tc.memory, decisions(rec, ResultDenied, PathLocal, tc.name), "%s\n%s", tc.name, rec.dump())
			require.Equal(t, tc.allowed+tc.denied, rec.countNamed(ObsLimitDecision, ResultNone, tc.name), "%s\n%s", tc.name, rec.dump())
			if tc.l != nil {
				require.Equal(t, LimiterStats{Allowed: tc.allowed, Denied: tc.denied, FromMemory: tc.memory}, tc.l.Stats(), tc.name)
			}
		}
		require.Zero(t, rec.countNamed(ObsLimitDecision, ResultNone, "wide"), "a policy that never binds names no decision")
	})
}

// TestObserveLimitRedisDown stops Redis: FailOpen and FailClosed report
// degraded decisions (PathNone: no limiter decided), LocalFallback the
// allowed and denied decisions of its local limiter (PathFallback).
func TestObserveLimitRedisDown(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		c := f.Client()
		rec := newRecorder()
		br := NewBreaker(BreakerConfig{Failures: 3, Cooldown: time.Minute, Logger: discardLogger()})
		mk := func(name string, fp FailurePolicy, share float64) (*Limiter, *rlServer) {
			l, err := NewLimiter(LimiterConfig{Client: c, Name: name,
				Options:  Options{Prefix: f.Keys.Prefix(), Timeout: 300 * time.Millisecond, Breaker: br, Logger: discardLogger(), Observer: rec},
				Policies: []Policy{{Name: name, Algorithm: FixedWindow, Limit: 10, Window: time.Hour}}, OnRedisError: fp, FallbackShare: share})
			require.NoError(t, err)
			return l, newRLServer(t, RateLimitConfig{Limiter: l}, nil)
		}
		open, openS := mk("open", FailOpen, 0)
		closed, closedS := mk("closed", FailClosed, 0)
		local, localS := mk("local", LocalFallback, 0.3)
		for _, s := range []*rlServer{openS, closedS, localS} {
			require.Equal(t, http.StatusOK, s.do("192.0.2.1:1", nil).Code)
		}
		require.Equal(t, int64(3), decisions(rec, ResultAllowed, PathRedis, ""), rec.dump())

		f.Stop(t)
		for range 4 {
			require.Equal(t, http.StatusOK, openS.do("192.0.2.1:1", nil).Code)
			require.Equal(t, http.StatusServiceUnavailable, closedS.do("192.0.2.1:1", nil).Code)
		}
		for i := range 5 {
			want := http.StatusOK
			if i >= 3 { // 30% of 10
				want = http.StatusTooManyRequests
			}
			require.Equal(t, want, localS.do("192.0.2.1:1", nil).Code, "local request %d", i)
		}
		require.True(t, br.AnyOpen(), "decisions under an open breaker are degraded too")

		requireOnePerDecision(t, rec, 3+4+4+5)
		require.Equal(t, int64(4), decisions(rec, ResultDegraded, PathNone, "open"), rec.dump())
		require.Equal(t, int64(4), decisions(rec, ResultDegraded, PathNone, "closed"), rec.dump())
		require.Equal(t, int64(3), decisions(rec, ResultAllowed, PathFallback, "local"), rec.dump())
		require.Equal(t, int64(2), decisions(rec, ResultDenied, PathFallback, "local"), rec.dump())
		require.Zero(t, decisions(rec, ResultDegraded, PathNone, "local"), "the fallback decides: allowed or denied, not degraded")
		require.Equal(t, int64(8), rec.count(ObsLimitDecision, ResultDegraded))

		require.Equal(t, LimiterStats{Allowed: 1, Degraded: 4}, open.Stats())
		require.Equal(t, LimiterStats{Allowed: 1, Degraded: 4}, closed.Stats())
		require.Equal(t, LimiterStats{Allowed: 1 + 3, Denied: 2, Fallback: 5}, local.Stats())
	})
}

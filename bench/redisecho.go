package main

// redisecho cases: the library under test, configured as its documentation
// shows, with the same handlers as the peer cases they compete with.

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"github.com/redisecho/redisecho"
)

// newRueidis returns a rueidis client with default options (client-side
// caching on), closed when the harness stops.
func newRueidis(env *Env) (rueidis.Client, error) {
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{env.Redis}})
	if err != nil {
		return nil, err
	}
	env.OnClose(func() error { client.Close(); return nil })
	return client, nil
}

// redisechoSessionCase: redisecho sessions (one hash per session, saved
// field by field by one script; reads through client-side caching), with
// the handlers of redistoreCase and scsCase: login stores the user and a
// counter; the route answers 401 without a live session, and the write
// case increments the counter.
func redisechoSessionCase(name, path string, write bool) Case {
	method := sessionMethod(write)
	return Case{
		Name: name, Baseline: "/n", Method: method, Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			client, err := newRueidis(env)
			if err != nil {
				return err
			}
			store, err := redisecho.NewSessionStore(redisecho.SessionConfig{
				Client:         client,
				Keys:           []string{"bench-session-key-0123456789abcdef"}, // >= 32 bytes
				CookieName:     "bench_redisecho",
				InsecureCookie: true, // the bench is plain HTTP
				Options:        redisecho.Options{Prefix: env.KeyPrefix},
			})
			if err != nil {
				return err
			}

			g := e.Group(path, store.Middleware())
			g.POST("/login", func(c echo.Context) error {
				s, err := redisecho.GetSession(c)
				if err != nil {
					return err
				}
				if err := s.Set("user", sessionValue); err != nil {
					return err
				}
				if err := s.Set("n", 0); err != nil {
					return err
				}
				return handleN(c)
			})
			g.Match([]string{method}, "", func(c echo.Context) error {
				s, err := redisecho.GetSession(c)
				if err != nil {
					return err
				}
				if user, _ := s.GetString("user"); user != sessionValue {
					return errNoSession
				}
				if write {
					n, _ := s.GetInt("n")
					if err := s.Set("n", n+1); err != nil {
						return err
					}
				}
				return handleN(c)
			})
			return nil
		},
		Setup: loginSetup(path + "/login"),
	}
}

// redisechoCacheCase: the redisecho response cache with its defaults (keyed
// by method, path, query and the Accept, Accept-Encoding and
// Accept-Language headers; entries read through client-side caching), TTL
// 10 minutes, in front of the guide's handler. A warm hit is served from
// the rueidis client-side cache: no Redis round trip.
func redisechoCacheCase(name, path string) Case {
	var misses atomic.Int64
	return Case{
		Name: name, Baseline: "/p", Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			client, err := newRueidis(env)
			if err != nil {
				return err
			}
			mw, err := redisecho.CacheConfig{
				Client:  client,
				TTL:     10 * time.Minute,
				Options: redisecho.Options{Prefix: env.KeyPrefix},
			}.ToMiddleware()
			if err != nil {
				return err
			}
			e.Group(path, mw).GET("", func(c echo.Context) error {
				return c.JSON(http.StatusOK, loadProducts(&misses))
			})
			return nil
		},
		Setup: plainWarmSetup(path, &misses),
	}
}

// plainWarmSetup is warmSetup for a cache keyed by request headers: it
// requests path as wrk does, without the Accept-Encoding: gzip that Go's
// client adds by default (which would warm another variant), and checks
// that the next request is answered X-Cache: HIT.
func plainWarmSetup(path string, misses *atomic.Int64) func(context.Context, *Env) (http.Header, error) {
	return func(ctx context.Context, env *Env) (http.Header, error) {
		client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableCompression: true}}
		defer client.CloseIdleConnections()
		plain := *env
		plain.HTTP = client
		if _, err := warmSetup(path, misses)(ctx, &plain); err != nil {
			return nil, err
		}
		resp, _, err := plain.Do(ctx, http.MethodGet, path, nil)
		if err != nil {
			return nil, err
		}
		if got := resp.Header.Get("X-Cache"); got != "HIT" {
			return nil, fmt.Errorf("cache not warm: X-Cache is %q, want HIT", got)
		}
		return nil, nil
	}
}

// redisechoRateCase: the redisecho RateLimit middleware with its defaults
// (keyed by client IP, the draft and legacy headers on, the free path on),
// making the check redisRateCase makes: one GCRA decision per request
// (TokenBucket, redis_rate's algorithm) with a limit so large nothing is
// denied (a denial answers 429 and marks the case broken).
func redisechoRateCase(name, path string) Case {
	return Case{
		Name: name, Baseline: "/p", Path: path,
		// One token per microsecond (the finest rate a TokenBucket takes)
		// and a bucket of 2^30: never denied at this load.
		Register: rateLimitRegister(path, redisecho.Policy{Algorithm: redisecho.TokenBucket, Limit: 1_000_000, Window: time.Second, Burst: 1 << 30}),
	}
}

// rateLimitRegister registers handleP at path behind the redisecho
// RateLimit middleware with its defaults and one policy.
func rateLimitRegister(path string, p redisecho.Policy) func(e *echo.Echo, env *Env) error {
	return func(e *echo.Echo, env *Env) error {
		client, err := newRueidis(env)
		if err != nil {
			return err
		}
		mw, err := redisecho.RateLimitConfig{
			Client:   client,
			Options:  redisecho.Options{Prefix: env.KeyPrefix},
			Policies: []redisecho.Policy{p},
		}.ToMiddleware()
		if err != nil {
			return err
		}
		e.Group(path, mw).GET("", handleP)
		return nil
	}
}

// redisechoRejectedCase: the redisecho RateLimit middleware with its
// defaults on a key that is blocked: one request per hour (FixedWindow, so
// the denial lasts until the window started by the first request ends, an
// hour later). Setup uses the unit and gets the first 429, which puts the
// key in the free path; from then on every request is answered 429 from
// process memory, without a Redis command. It is compared with /p, the
// same route without a limiter: what a rejected request costs next to the
// work it spares.
func redisechoRejectedCase(name, path string) Case {
	return Case{
		Name: name, Baseline: "/p", Path: path, Status: http.StatusTooManyRequests,
		Register: rateLimitRegister(path, redisecho.Policy{Algorithm: redisecho.FixedWindow, Limit: 1, Window: time.Hour}),
		Setup:    blockSetup(path),
	}
}

// blockSetup returns a Setup that gets path's rate limit key blocked in the
// free path: it requests path until the first 429 (the first request uses
// the single unit, unless an earlier run against the same Redis did), then
// checks that further 429s are answered without Redis: n of them must run
// fewer than n Redis commands (a denial decided by Redis runs at least 3;
// the margin is for other clients' idle PINGs).
func blockSetup(path string) func(context.Context, *Env) (http.Header, error) {
	return func(ctx context.Context, env *Env) (http.Header, error) {
		for i := 0; ; i++ {
			resp, body, err := env.Send(ctx, http.MethodGet, path, nil)
			if err != nil {
				return nil, err
			}
			if resp.StatusCode == http.StatusTooManyRequests {
				break
			}
			if resp.StatusCode != http.StatusOK || i > 0 {
				return nil, fmt.Errorf("GET %s: %s, want 200 then 429: %s", path, resp.Status, bytes.TrimSpace(body))
			}
		}

		rc, err := dialRedis(env.Redis)
		if err != nil {
			return nil, err
		}
		defer rc.Close()
		before, err := rc.totalCalls()
		if err != nil {
			return nil, err
		}
		const n = 20
		for range n {
			resp, body, err := env.Send(ctx, http.MethodGet, path, nil)
			if err != nil {
				return nil, err
			}
			if resp.StatusCode != http.StatusTooManyRequests {
				return nil, fmt.Errorf("GET %s: %s, want 429: %s", path, resp.Status, bytes.TrimSpace(body))
			}
		}
		after, err := rc.totalCalls()
		if err != nil {
			return nil, err
		}
		if cmds := after - before - 1; cmds >= n { // minus the first INFO
			return nil, fmt.Errorf("%d rejected requests ran %d Redis commands: they are not answered by the free path", n, cmds)
		}
		return nil, nil
	}
}

package main

// Peer cases: the libraries redisecho users would otherwise pick, each
// configured the way their documentation shows.

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/alexedwards/scs/goredisstore"
	"github.com/alexedwards/scs/v2"
	"github.com/boj/redistore"
	cache "github.com/go-redis/cache/v9"
	"github.com/go-redis/redis_rate/v10"
	"github.com/labstack/echo-contrib/session"
	"github.com/labstack/echo/v4"
	"github.com/redis/go-redis/v9"
)

// sessionValue is stored at login and checked by the read cases, so a lost
// session answers 401 instead of a fast, empty 200.
const sessionValue = "bench-user"

// errNoSession is returned (as 401) when a request carries no live session.
var errNoSession = echo.NewHTTPError(http.StatusUnauthorized, "no live session")

// loginSetup returns a Setup that calls POST loginPath once and hands the
// session cookie(s) it sets to wrk, in one Cookie header.
func loginSetup(loginPath string) func(context.Context, *Env) (http.Header, error) {
	return func(ctx context.Context, env *Env) (http.Header, error) {
		resp, _, err := env.Do(ctx, http.MethodPost, loginPath, nil)
		if err != nil {
			return nil, err
		}
		var cookies []string
		for _, c := range resp.Cookies() {
			cookies = append(cookies, c.Name+"="+c.Value)
		}
		if len(cookies) == 0 {
			return nil, errors.New("login set no cookie")
		}
		return http.Header{"Cookie": {strings.Join(cookies, "; ")}}, nil
	}
}

func newGoRedis(env *Env) *redis.Client {
	rdb := redis.NewClient(&redis.Options{Addr: env.Redis})
	env.OnClose(rdb.Close)
	return rdb
}

// redistoreCase: echo-contrib/session (gorilla/sessions) on boj/redistore
// (redigo). The pool keeps up to 64 idle connections so that wrk's 32
// connections never force redials; redistore PINGs every borrowed
// connection (its TestOnBorrow), which shows in Redis cmds/req.
func redistoreCase(name, path string, write bool) Case {
	const cookie = "bench_session"
	method := sessionMethod(write)
	return Case{
		Name: name, Baseline: "/n", Method: method, Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			store, err := redistore.NewRediStore(64, "tcp", env.Redis, "", "",
				[]byte("bench-hash-key-0123456789abcdef!"))
			if err != nil {
				return err
			}
			store.SetKeyPrefix(env.KeyPrefix)
			env.OnClose(store.Close)

			g := e.Group(path, session.Middleware(store))
			g.POST("/login", func(c echo.Context) error {
				s, err := session.Get(cookie, c)
				if err != nil && s == nil {
					return err
				}
				s.Values["user"] = sessionValue
				s.Values["n"] = 0
				if err := s.Save(c.Request(), c.Response()); err != nil {
					return err
				}
				return handleN(c)
			})
			g.Match([]string{method}, "", func(c echo.Context) error {
				s, err := session.Get(cookie, c)
				if err != nil {
					return err
				}
				if s.IsNew || s.Values["user"] != sessionValue {
					return errNoSession
				}
				if write {
					n, _ := s.Values["n"].(int)
					s.Values["n"] = n + 1
					if err := s.Save(c.Request(), c.Response()); err != nil {
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

// scsCase: alexedwards/scs on goredisstore (go-redis), mounted with
// echo.WrapMiddleware(sm.LoadAndSave) as scs documents for Echo.
func scsCase(name, path string, write bool) Case {
	method := sessionMethod(write)
	return Case{
		Name: name, Baseline: "/n", Method: method, Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			sm := scs.New()
			sm.Lifetime = 24 * time.Hour
			sm.Cookie.Name = "bench_scs"
			sm.Store = goredisstore.NewWithPrefix(newGoRedis(env), env.KeyPrefix)

			g := e.Group(path, echo.WrapMiddleware(sm.LoadAndSave))
			g.POST("/login", func(c echo.Context) error {
				ctx := c.Request().Context()
				sm.Put(ctx, "user", sessionValue)
				sm.Put(ctx, "n", 0)
				return handleN(c)
			})
			g.Match([]string{method}, "", func(c echo.Context) error {
				ctx := c.Request().Context()
				if sm.GetString(ctx, "user") != sessionValue {
					return errNoSession
				}
				if write {
					sm.Put(ctx, "n", sm.GetInt(ctx, "n")+1)
				}
				return handleN(c)
			})
			return nil
		},
		Setup: loginSetup(path + "/login"),
	}
}

// redisRateCase: go-redis/redis_rate, one Allow per request keyed by client
// IP, with a limit so large nothing is denied (a denial answers 429 and
// marks the case broken).
func redisRateCase(name, path string) Case {
	return Case{
		Name: name, Baseline: "/p", Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			limiter := redis_rate.NewLimiter(newGoRedis(env))
			limit := redis_rate.Limit{Rate: 1 << 30, Burst: 1 << 30, Period: time.Second}
			g := e.Group(path, func(next echo.HandlerFunc) echo.HandlerFunc {
				return func(c echo.Context) error {
					res, err := limiter.Allow(c.Request().Context(), env.KeyPrefix+c.RealIP(), limit)
					if err != nil {
						return err
					}
					if res.Allowed == 0 {
						return echo.NewHTTPError(http.StatusTooManyRequests)
					}
					return next(c)
				}
			})
			g.GET("", handleP)
			return nil
		},
	}
}

// loadProducts stands for the slow source (a database query) the caches
// front. It counts its calls: a warm cache never reaches it.
func loadProducts(misses *atomic.Int64) []Product {
	misses.Add(1)
	return append([]Product(nil), products...)
}

// warmSetup requests path once, filling the cache (a key left by an earlier
// run against the same Redis may already be there), and checks that the
// next request is a hit: it does not reach the source.
func warmSetup(path string, misses *atomic.Int64) func(context.Context, *Env) (http.Header, error) {
	return func(ctx context.Context, env *Env) (http.Header, error) {
		if _, _, err := env.Do(ctx, http.MethodGet, path, nil); err != nil {
			return nil, err
		}
		before := misses.Load()
		if _, _, err := env.Do(ctx, http.MethodGet, path, nil); err != nil {
			return nil, err
		}
		if misses.Load() != before {
			return nil, errors.New("cache not warm: a second request reached the source")
		}
		return nil, nil
	}
}

// goRedisCacheCase: go-redis/cache as its README shows it, cache-aside with
// Once, a local TinyLFU (1000 entries, 1 minute TTL) in front of Redis
// (1 hour TTL); the handler renders the cached []Product as JSON. Hits are
// served from the local cache; Redis is read only when the local entry
// expires.
func goRedisCacheCase(name, path string) Case {
	var misses atomic.Int64
	return Case{
		Name: name, Baseline: "/p", Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			c := cache.New(&cache.Options{
				Redis:      newGoRedis(env),
				LocalCache: cache.NewTinyLFU(1000, time.Minute),
			})
			key := env.KeyPrefix + "products"
			e.Group(path).GET("", func(ec echo.Context) error {
				var ps []Product
				err := c.Once(&cache.Item{
					Ctx:   ec.Request().Context(),
					Key:   key,
					Value: &ps,
					TTL:   time.Hour,
					Do:    func(*cache.Item) (any, error) { return loadProducts(&misses), nil },
				})
				if err != nil {
					return err
				}
				return ec.JSON(http.StatusOK, ps)
			})
			return nil
		},
		Setup: warmSetup(path, &misses),
	}
}

// guideCacheCase: the response cache of the guide's Express + Redis app,
// in Echo: a middleware keyed by the request URL that does one go-redis GET
// per request and, on a hit, sends the stored JSON as is; on a miss it runs
// the handler, tees its body and SETs it with a TTL.
func guideCacheCase(name, path string) Case {
	var misses atomic.Int64
	return Case{
		Name: name, Baseline: "/p", Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			rdb := newGoRedis(env)
			cacheMW := func(next echo.HandlerFunc) echo.HandlerFunc {
				return func(c echo.Context) error {
					ctx := c.Request().Context()
					key := env.KeyPrefix + c.Request().URL.String()
					b, err := rdb.Get(ctx, key).Bytes()
					if err == nil {
						return c.JSONBlob(http.StatusOK, b)
					}
					if !errors.Is(err, redis.Nil) {
						return err
					}
					tee := &teeWriter{ResponseWriter: c.Response().Writer}
					c.Response().Writer = tee
					if err := next(c); err != nil {
						return err
					}
					if c.Response().Status != http.StatusOK {
						return nil
					}
					return rdb.Set(ctx, key, tee.body.Bytes(), time.Hour).Err()
				}
			}
			e.Group(path, cacheMW).GET("", func(c echo.Context) error {
				return c.JSON(http.StatusOK, loadProducts(&misses))
			})
			return nil
		},
		Setup: warmSetup(path, &misses),
	}
}

// teeWriter keeps a copy of the response body.
type teeWriter struct {
	http.ResponseWriter
	body bytes.Buffer
}

func (w *teeWriter) Write(b []byte) (int, error) {
	w.body.Write(b)
	return w.ResponseWriter.Write(b)
}

// sessionMethod is the method of a session case: writes POST, reads GET.
func sessionMethod(write bool) string {
	if write {
		return http.MethodPost
	}
	return http.MethodGet
}

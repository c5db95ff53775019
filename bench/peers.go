package main

// Peer cases: the libraries redisecho users would otherwise pick, each
// configured the way their documentation shows.

import (
	"bytes"
	"context"
	"errors"
	"net/http"
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
// session cookie(s) it sets to wrk.
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
		h := http.Header{}
		for _, c := range cookies {
			h.Add("Cookie", c)
		}
		return h, nil
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
	method := http.MethodGet
	if write {
		method = http.MethodPost
	}
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
	method := http.MethodGet
	if write {
		method = http.MethodPost
	}
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

// captureWriter tees a response body so a cache middleware can store it.
type captureWriter struct {
	http.ResponseWriter
	buf bytes.Buffer
}

func (w *captureWriter) Write(b []byte) (int, error) {
	w.buf.Write(b)
	return w.ResponseWriter.Write(b)
}

// responseCache is the shape both cache cases share: a response-cache
// middleware keyed by path that serves a hit as a JSON blob and, on a miss,
// runs the handler and stores its 200 body.
func responseCache(prefix string, get func(ctx context.Context, key string) ([]byte, bool, error),
	set func(ctx context.Context, key string, body []byte) error,
) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			ctx := c.Request().Context()
			key := prefix + c.Request().URL.Path
			body, ok, err := get(ctx, key)
			if err != nil {
				return err
			}
			if ok {
				return c.Blob(http.StatusOK, echo.MIMEApplicationJSON, body)
			}
			cw := &captureWriter{ResponseWriter: c.Response().Writer}
			c.Response().Writer = cw
			if err := next(c); err != nil {
				return err
			}
			if c.Response().Status == http.StatusOK {
				return set(ctx, key, cw.buf.Bytes())
			}
			return nil
		}
	}
}

// warmSetup requests path twice: the first fills the cache, the second hits.
func warmSetup(path string) func(context.Context, *Env) (http.Header, error) {
	return func(ctx context.Context, env *Env) (http.Header, error) {
		for range 2 {
			if _, _, err := env.Do(ctx, http.MethodGet, path, nil); err != nil {
				return nil, err
			}
		}
		return nil, nil
	}
}

// goRedisCacheCase: go-redis/cache with its local TinyLFU (1000 entries,
// 1 minute TTL) in front of Redis (1 hour TTL). Hits are served from the
// local cache; Redis is read only when the local entry expires.
func goRedisCacheCase(name, path string) Case {
	return Case{
		Name: name, Baseline: "/p", Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			c := cache.New(&cache.Options{
				Redis:      newGoRedis(env),
				LocalCache: cache.NewTinyLFU(1000, time.Minute),
			})
			get := func(ctx context.Context, key string) ([]byte, bool, error) {
				var b []byte
				err := c.Get(ctx, key, &b)
				if errors.Is(err, cache.ErrCacheMiss) {
					return nil, false, nil
				}
				return b, err == nil, err
			}
			set := func(ctx context.Context, key string, body []byte) error {
				return c.Set(&cache.Item{Ctx: ctx, Key: key, Value: body, TTL: time.Hour})
			}
			e.Group(path, responseCache(env.KeyPrefix, get, set)).GET("", handleP)
			return nil
		},
		Setup: warmSetup(path),
	}
}

// guideCacheCase: the cache the usual guide shows, one go-redis GET per
// hit, SET with a TTL on a miss.
func guideCacheCase(name, path string) Case {
	return Case{
		Name: name, Baseline: "/p", Path: path,
		Register: func(e *echo.Echo, env *Env) error {
			rdb := newGoRedis(env)
			get := func(ctx context.Context, key string) ([]byte, bool, error) {
				b, err := rdb.Get(ctx, key).Bytes()
				if errors.Is(err, redis.Nil) {
					return nil, false, nil
				}
				return b, err == nil, err
			}
			set := func(ctx context.Context, key string, body []byte) error {
				return rdb.Set(ctx, key, body, time.Hour).Err()
			}
			e.Group(path, responseCache(env.KeyPrefix, get, set)).GET("", handleP)
			return nil
		},
		Setup: warmSetup(path),
	}
}

package main

// redisecho cases: the library under test, configured as its documentation
// shows, with the same handlers as the peer cases they compete with.

import (
	"net/http"

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
	method := http.MethodGet
	if write {
		method = http.MethodPost
	}
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

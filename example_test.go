package redisecho_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"

	"github.com/redisecho/redisecho"
)

// The examples below compile with the suite; those without an Output
// comment need a Redis server and are not run.

func ExampleKeyspace() {
	ks, _ := redisecho.NewKeyspace("myapp:")
	g := ks.Group("queue", "emails")
	fmt.Println(g.Key("pending"))
	fmt.Println(g.Key("active"))
	fmt.Println(ks.Key("cache", "/users/{id}"))
	// Output:
	// myapp:{queue:emails}:pending
	// myapp:{queue:emails}:active
	// myapp:cache:/users/%7Bid%7D
}

func ExampleSession() {
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:6379"}})
	if err != nil {
		panic(err)
	}
	defer client.Close()

	e := echo.New()
	e.Use(redisecho.Session(client, os.Getenv("SESSION_KEY"))) // at least 32 bytes
	e.POST("/login", func(c echo.Context) error {
		s, err := redisecho.GetSession(c)
		if err != nil {
			return err
		}
		if err := s.Regenerate(); err != nil { // against fixation
			return err
		}
		if err := s.SetUserID("42"); err != nil {
			return err
		}
		if err := s.Set("username", "alice"); err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]string{"message": "Login successful"})
	})
	e.GET("/profile", func(c echo.Context) error {
		s, err := redisecho.GetSession(c)
		if err != nil {
			return err
		}
		name, ok := s.GetString("username")
		if !ok {
			return c.JSON(http.StatusUnauthorized, map[string]string{"error": "Not authenticated"})
		}
		return c.JSON(http.StatusOK, map[string]string{"username": name})
	})
}

func ExampleCacheWithConfig() {
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:6379"}})
	if err != nil {
		panic(err)
	}
	defer client.Close()

	e := echo.New()
	products := redisecho.CacheWithConfig(redisecho.CacheConfig{
		Client: client,
		TTL:    10 * time.Minute,
		Tags:   func(echo.Context) []string { return []string{"products"} },
	})
	e.GET("/api/products", func(c echo.Context) error {
		return c.JSON(http.StatusOK, []string{"apple", "pear"})
	}, products)
	e.PUT("/api/products/:id", func(c echo.Context) error {
		cs, err := redisecho.GetCache(c)
		if err != nil {
			return err
		}
		// ...update the product, then:
		if err := cs.InvalidateTags(c.Request().Context(), "products", "product:"+c.Param("id")); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	}, products)
}

func ExampleRemember() {
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:6379"}})
	if err != nil {
		panic(err)
	}
	defer client.Close()
	cs, err := redisecho.NewCacheStore(redisecho.CacheStoreConfig{Client: client})
	if err != nil {
		panic(err)
	}

	type product struct{ Name string }
	p, err := redisecho.Remember(context.Background(), cs, "product:7", 5*time.Minute,
		func(ctx context.Context) (product, error) {
			return product{Name: "Product 7"}, nil // load it from the database
		},
		redisecho.WithTags("products", "product:7"),
		redisecho.CacheNotFound(30*time.Second))
	fmt.Println(p.Name, err)
}

func ExampleReadiness() {
	holder := redisecho.NewClientHolder(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:6379"}})
	holder.Start() // dials in the background: the app starts even while Redis is down
	defer holder.Close()

	e := echo.New()
	e.GET("/health", redisecho.ReadinessWithConfig(redisecho.ReadinessConfig{Holder: holder}))
	e.GET("/livez", redisecho.Liveness())
}

func ExampleSSEWithConfig() {
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:6379"}})
	if err != nil {
		panic(err)
	}
	defer client.Close()
	hub, err := redisecho.NewHub(redisecho.HubConfig{Client: client})
	if err != nil {
		panic(err)
	}

	e := echo.New()
	e.Use(redisecho.Session(client, os.Getenv("SESSION_KEY")))
	// GET /events?channels=room:a,room:b streams those rooms, plus the
	// logged-in user's own channel.
	e.GET("/events", redisecho.SSEWithConfig(redisecho.SSEConfig{
		Hub: hub,
		Channels: func(c echo.Context) ([]string, error) {
			rooms := strings.Split(c.QueryParam("rooms"), ",")
			if s, err := redisecho.GetSession(c); err == nil && s.UserID() != "" {
				rooms = append(rooms, "user:"+s.UserID())
			}
			return rooms, nil
		},
		Authorize: func(c echo.Context, channel string) error {
			if channel == "admin" {
				return echo.ErrForbidden
			}
			return nil
		},
	}))
	// Publish from anywhere: a handler, a job, another service.
	e.POST("/rooms/:room/messages", func(c echo.Context) error {
		pos, err := hub.Publish(c.Request().Context(), c.Param("room"), redisecho.Event{
			Name: "chat:message", Data: []byte(`{"text":"hello"}`),
		})
		if err != nil {
			return err
		}
		return c.JSON(http.StatusAccepted, map[string]string{"id": pos.String()})
	})

	srv := &http.Server{Addr: ":8080", Handler: e}
	srv.RegisterOnShutdown(func() { _ = hub.Shutdown(context.Background()) }) // ends the streams, so Shutdown does not wait for them
	_ = srv.ListenAndServe()
}

package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"

	"github.com/redisecho/redisecho"
)

// product is one item of the demo catalogue.
type product struct {
	ID    int     `json:"id"`
	Name  string  `json:"name"`
	Price float64 `json:"price"`
}

// catalogue is the demo's in-memory "database": products 1 to 20.
type catalogue struct {
	mu       sync.RWMutex
	products map[int]product
}

func newCatalogue() *catalogue {
	c := &catalogue{products: map[int]product{}}
	for i := 1; i <= 20; i++ {
		c.products[i] = product{ID: i, Name: fmt.Sprintf("Product %d", i), Price: float64(i) * 9.99}
	}
	return c
}

func (c *catalogue) list() []product {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]product, 0, len(c.products))
	for i := 1; i <= len(c.products); i++ {
		out = append(out, c.products[i])
	}
	return out
}

func (c *catalogue) get(id int) (product, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	p, ok := c.products[id]
	return p, ok
}

// update applies the fields that are set and returns the product.
func (c *catalogue) update(id int, name *string, price *float64) (product, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.products[id]
	if !ok {
		return p, false
	}
	if name != nil {
		p.Name = *name
	}
	if price != nil {
		p.Price = *price
	}
	c.products[id] = p
	return p, true
}

// mountAPI adds the guide's cached routes to api, the /api group, whose
// middleware (the rate limiter) runs before each route's cache:
//
//	GET /api/products       cached 10 min, tagged "products"
//	GET /api/products/:id   cached 5 min, tagged "product:<id>"; 404s cached 30 s
//	GET /api/users/:id      cached under the guide's custom key "user:<id>"
//	PUT /api/products/:id   updates, then invalidates "product:<id>" and "products"
func mountAPI(api *echo.Group, client rueidis.Client, opts redisecho.Options) error {
	store, err := redisecho.NewCacheStore(redisecho.CacheStoreConfig{Client: client, Options: opts})
	if err != nil {
		return err
	}
	db := newCatalogue()
	users := map[string]map[string]any{
		"1": {"id": 1, "username": "alice"},
		"2": {"id": 2, "username": "bob"},
	}
	cache := func(cfg redisecho.CacheConfig) (echo.MiddlewareFunc, error) {
		cfg.Store = store
		return cfg.ToMiddleware()
	}
	list, err := cache(redisecho.CacheConfig{
		TTL:  10 * time.Minute,
		Tags: func(echo.Context) []string { return []string{"products"} },
	})
	if err != nil {
		return err
	}
	item, err := cache(redisecho.CacheConfig{
		TTL:         5 * time.Minute,
		NotFoundTTL: 30 * time.Second,
		Tags:        func(c echo.Context) []string { return []string{"product:" + c.Param("id")} },
	})
	if err != nil {
		return err
	}
	user, err := cache(redisecho.CacheConfig{
		TTL:     5 * time.Minute,
		KeyFunc: func(c echo.Context) string { return "user:" + c.Param("id") },
	})
	if err != nil {
		return err
	}
	// Writes pass through the cache middleware (it caches only GET and
	// HEAD), which hands them the store for invalidation.
	writes, err := cache(redisecho.CacheConfig{})
	if err != nil {
		return err
	}

	api.GET("/products", func(c echo.Context) error {
		return c.JSON(http.StatusOK, db.list())
	}, list)
	api.GET("/products/:id", func(c echo.Context) error {
		id, err := strconv.Atoi(c.Param("id"))
		p, ok := db.get(id)
		if err != nil || !ok {
			return jsonError(c, http.StatusNotFound, "Product not found")
		}
		return c.JSON(http.StatusOK, p)
	}, item)
	api.GET("/users/:id", func(c echo.Context) error {
		u, ok := users[c.Param("id")]
		if !ok {
			return jsonError(c, http.StatusNotFound, "User not found")
		}
		return c.JSON(http.StatusOK, u)
	}, user)
	api.PUT("/products/:id", func(c echo.Context) error {
		id, err := strconv.Atoi(c.Param("id"))
		if _, ok := db.get(id); err != nil || !ok {
			return jsonError(c, http.StatusNotFound, "Product not found")
		}
		var in struct {
			Name  *string  `json:"name"`
			Price *float64 `json:"price"`
		}
		dec := json.NewDecoder(c.Request().Body)
		dec.DisallowUnknownFields()
		if err := dec.Decode(&in); err != nil {
			return jsonError(c, http.StatusBadRequest, "Body must be a JSON object with an optional string name and number price")
		}
		if in.Name != nil && (*in.Name == "" || len(*in.Name) > 200) || in.Price != nil && *in.Price < 0 {
			return jsonError(c, http.StatusBadRequest, "name must be 1-200 bytes and price not negative")
		}
		p, _ := db.update(id, in.Name, in.Price)
		cs, err := redisecho.GetCache(c)
		if err != nil {
			return err
		}
		if err := cs.InvalidateTags(c.Request().Context(), "product:"+c.Param("id"), "products"); err != nil {
			// The data changed; stale pages would be served until their TTL.
			// Say so instead of pretending all is well.
			return echo.NewHTTPError(http.StatusServiceUnavailable, "updated, but the cache could not be invalidated").SetInternal(err)
		}
		return c.JSON(http.StatusOK, p)
	}, writes)
	return nil
}

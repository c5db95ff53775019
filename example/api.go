package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
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

// catalogueSize is the number of demo products: IDs 1 to catalogueSize.
const catalogueSize = 20

// dbTimeout bounds every catalogue call, as the library bounds its own.
const dbTimeout = 500 * time.Millisecond

// errNoProduct is the catalogue's "not found".
var errNoProduct = errors.New("no such product")

// catalogue is the demo's "database": a stand-in for the app's own, kept in
// Redis so that every instance of the app sees the same products. It is one
// hash under the example's prefix, with two fields per product:
//
//	redisecho:{example:catalogue}:products   "<id>:name" → name, "<id>:price" → price
//
// One key, so one slot on a cluster: an update of both fields is a single
// atomic HSET. Products are seeded at startup and never deleted.
type catalogue struct {
	client rueidis.Client
	key    string
}

func newCatalogue(client rueidis.Client) *catalogue {
	return &catalogue{client: client, key: redisecho.Keyspace{}.Group("example", "catalogue").Key("products")}
}

func nameField(id int) string  { return strconv.Itoa(id) + ":name" }
func priceField(id int) string { return strconv.Itoa(id) + ":price" }

// seed writes the demo products that are missing, leaving the ones there
// alone (HSETNX): any number of instances may start at once, and a restart
// keeps the prices set since. It reads first and writes only what is
// missing, so an instance starting while Redis is full (and refuses every
// write, HSETNX included, even of a field that exists) starts all the same
// once the catalogue is complete.
func (db *catalogue) seed(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	fields := allFields()
	vals, err := db.client.Do(ctx, db.client.B().Hmget().Key(db.key).Field(fields...).Build()).ToArray()
	if err != nil {
		return fmt.Errorf("seed the catalogue: read it: %w", err)
	}
	if len(vals) != len(fields) {
		return fmt.Errorf("seed the catalogue: HMGET: %d values for %d fields", len(vals), len(fields))
	}
	var cmds rueidis.Commands
	for i, v := range vals {
		if v.IsNil() {
			cmds = append(cmds, db.client.B().Hsetnx().Key(db.key).Field(fields[i]).Value(seedValue(i)).Build())
		}
	}
	if len(cmds) == 0 {
		return nil
	}
	for _, r := range db.client.DoMulti(ctx, cmds...) {
		if err := r.Error(); err != nil {
			return fmt.Errorf("seed the catalogue: %w", err)
		}
	}
	return nil
}

// allFields are the catalogue's fields, product by product, name then
// price: the order of seedValue and of list's replies.
func allFields() []string {
	fields := make([]string, 0, 2*catalogueSize)
	for id := 1; id <= catalogueSize; id++ {
		fields = append(fields, nameField(id), priceField(id))
	}
	return fields
}

// seedValue is the demo value of allFields()[i].
func seedValue(i int) string {
	id := i/2 + 1
	if i%2 == 0 {
		return fmt.Sprintf("Product %d", id)
	}
	return formatPrice(float64(id) * 9.99)
}

func formatPrice(p float64) string { return strconv.FormatFloat(p, 'f', -1, 64) }

// decode turns an HMGET reply of a name and a price into a product.
func decode(id int, name, price rueidis.RedisMessage) (product, error) {
	n, err := name.ToString()
	if rueidis.IsRedisNil(err) {
		return product{}, errNoProduct
	}
	if err != nil {
		return product{}, err
	}
	ps, err := price.ToString()
	if err != nil {
		return product{}, fmt.Errorf("product %d: price: %w", id, err)
	}
	p, err := strconv.ParseFloat(ps, 64)
	if err != nil {
		return product{}, fmt.Errorf("product %d: price %q: %w", id, ps, err)
	}
	return product{ID: id, Name: n, Price: p}, nil
}

func (db *catalogue) get(ctx context.Context, id int) (product, error) {
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	vals, err := db.client.Do(ctx, db.client.B().Hmget().Key(db.key).Field(nameField(id), priceField(id)).Build()).ToArray()
	if err != nil {
		return product{}, err
	}
	if len(vals) != 2 {
		return product{}, fmt.Errorf("HMGET: %d values for 2 fields", len(vals))
	}
	return decode(id, vals[0], vals[1])
}

func (db *catalogue) list(ctx context.Context) ([]product, error) {
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	fields := allFields()
	vals, err := db.client.Do(ctx, db.client.B().Hmget().Key(db.key).Field(fields...).Build()).ToArray()
	if err != nil {
		return nil, err
	}
	if len(vals) != len(fields) {
		return nil, fmt.Errorf("HMGET: %d values for %d fields", len(vals), len(fields))
	}
	out := make([]product, 0, catalogueSize)
	for i := 0; i < len(vals); i += 2 {
		p, err := decode(i/2+1, vals[i], vals[i+1])
		if errors.Is(err, errNoProduct) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// updateScript applies an update to a product that exists, atomically,
// and returns the product's name and price afterwards. It changes nothing
// when it runs after its caller gave up: a call that timed out (Redis
// paused, a slow network) stays queued in the client and may reach Redis
// later, where a write would land behind the caller's cache invalidation
// and leave stale pages for their TTL.
//
//	KEYS[1]  the catalogue hash
//	ARGV[1]  not after: the caller's deadline in this node's clock (Redis
//	         TIME, in ms); later, the reply is an error "LATE" and nothing
//	         is written
//	ARGV[2]  the product's name field, whose presence says it exists
//	ARGV[3]  the product's price field
//	ARGV[4…] field, value pairs to set (none: a read)
//
// Reply: nil when the product does not exist, else {name, price}.
var updateScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[1]) then
  return redis.error_reply('LATE the caller gave up; nothing written')
end
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then return false end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
return redis.call('HMGET', KEYS[1], ARGV[2], ARGV[3])
`)

// clockScript is the Redis TIME, in ms, of the node that holds KEYS[1]
// (the catalogue): a script, so that a cluster routes it by key. It writes
// nothing.
var clockScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`)

// update applies the fields that are set and returns the product. It
// writes nothing after ctx's deadline (updateScript), so once it has
// failed, nothing it sent can change the catalogue later: invalidating the
// product's pages after a failure leaves none stale, whether the update
// ran (its reply lost) or not.
func (db *catalogue) update(ctx context.Context, id int, name *string, price *float64) (product, error) {
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	redisNow, err := clockScript.Exec(ctx, db.client, []string{db.key}, nil).AsInt64()
	if err != nil {
		return product{}, fmt.Errorf("update: read the clock: %w", err)
	}
	// redisNow was read at some instant before now, so redisNow + (the
	// time left from now) is at most the deadline in the node's clock: a
	// script that runs by then runs before this call gives up.
	notAfter := redisNow + time.Until(deadline).Milliseconds()
	args := []string{strconv.FormatInt(notAfter, 10), nameField(id), priceField(id)}
	if name != nil {
		args = append(args, nameField(id), *name)
	}
	if price != nil {
		args = append(args, priceField(id), formatPrice(*price))
	}
	vals, err := updateScript.Exec(ctx, db.client, []string{db.key}, args).ToArray()
	if rueidis.IsRedisNil(err) {
		return product{}, errNoProduct
	}
	if err != nil {
		return product{}, err
	}
	if len(vals) != 2 {
		return product{}, fmt.Errorf("update: %d values for 2 fields", len(vals))
	}
	return decode(id, vals[0], vals[1])
}

// maxID bounds the IDs the routes parse: nine digits, far above any demo
// product, so that an ID's key part stays short whatever a client sends.
const maxID = 999_999_999

// parseID reads an ID in its one canonical form: decimal digits, no sign,
// no leading zero, 1 to maxID. canonical reports whether s was written that
// way; ok is false for anything that is no ID at all. "07" and "+7" are
// product 7, not canonical: the routes redirect them to "7" (or refuse
// them) before they reach a cache key or a tag, so that one update never
// leaves a stale copy under another spelling.
func parseID(s string) (id int, canonical, ok bool) {
	if s == "" || len(s) > 12 {
		return 0, false, false
	}
	for i := 0; i < len(s); i++ {
		if (s[i] < '0' || s[i] > '9') && !(i == 0 && s[i] == '+') {
			return 0, false, false
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > maxID {
		return 0, false, false
	}
	return n, strconv.Itoa(n) == s, true
}

// canonicalIDFor is the middleware of the /api/<kind>/:id routes: it
// answers before the cache when the ID is not canonical. A GET or HEAD of
// another spelling of an ID ("/07", "/+7") is redirected (301) to the
// canonical URL, query kept; other methods, and anything that is no ID at
// all, get notFound as a 404, which is not cached: a junk ID leaves nothing
// in Redis.
func canonicalIDFor(kind, notFound string) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			id, canonical, ok := parseID(c.Param("id"))
			switch {
			case canonical:
				return next(c)
			case ok && (c.Request().Method == http.MethodGet || c.Request().Method == http.MethodHead):
				to := "/api/" + kind + "/" + strconv.Itoa(id)
				if q := c.Request().URL.RawQuery; q != "" {
					to += "?" + q
				}
				return c.Redirect(http.StatusMovedPermanently, to)
			default:
				return jsonError(c, http.StatusNotFound, notFound)
			}
		}
	}
}

// adminUserID is alice's ID: the demo admin, the only user who may change
// products.
const adminUserID = 1

// requireAdmin answers 401 without a login and 403 for any user but the
// admin, before anything else looks at the request. The Session middleware
// must run before it.
var requireAdmin = requireAdminTo("change products")

// requireAdminTo is requireAdmin, whose 403 says what only an admin may do.
func requireAdminTo(what string) echo.MiddlewareFunc {
	msg := "Only an admin may " + what
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			_, id, ok := current(c)
			switch {
			case !ok:
				return jsonError(c, http.StatusUnauthorized, "Not authenticated")
			case id != adminUserID:
				return jsonError(c, http.StatusForbidden, msg)
			}
			return next(c)
		}
	}
}

// mountAPI adds the guide's cached routes to api, the /api group, whose
// middleware (the rate limiter) runs before each route's cache:
//
//	GET /api/products       cached 10 min, tagged "products"
//	GET /api/products/:id   cached 5 min, tagged "product:<id>"; 404s cached 30 s
//	GET /api/users/:id      cached under the guide's custom key "user:<id>"
//	                        (each GET route answers HEAD too)
//	PUT /api/products/:id   alice only; updates, then invalidates
//	                        "product:<id>" and "products"
//
// IDs are canonical before they reach the cache (canonicalID), so one
// product has one cache entry and one tag. The products live in Redis
// (catalogue), so every instance serves the same ones, and an update on one
// instance invalidates the cached copies of all (their caches share the
// tags in Redis).
func mountAPI(api *echo.Group, client rueidis.Client, opts redisecho.Options, sessions echo.MiddlewareFunc) error {
	store, err := redisecho.NewCacheStore(redisecho.CacheStoreConfig{Client: client, Options: opts})
	if err != nil {
		return err
	}
	db := newCatalogue(client)
	users := map[int]map[string]any{
		1: {"id": 1, "username": "alice"},
		2: {"id": 2, "username": "bob"},
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
	unavailable := func(c echo.Context, err error) error {
		return echo.NewHTTPError(http.StatusServiceUnavailable, "catalogue unavailable").SetInternal(err)
	}
	productID := canonicalIDFor("products", "Product not found")
	userID := canonicalIDFor("users", "User not found")
	// The reads answer HEAD too (with GET's headers and no body), as HTTP
	// asks of every resource that answers GET; the cache serves both.
	get := func(path string, h echo.HandlerFunc, m ...echo.MiddlewareFunc) {
		api.GET(path, h, m...)
		api.HEAD(path, h, m...)
	}

	get("/products", func(c echo.Context) error {
		list, err := db.list(c.Request().Context())
		if err != nil {
			return unavailable(c, err)
		}
		return c.JSON(http.StatusOK, list)
	}, list)
	get("/products/:id", func(c echo.Context) error {
		id, _, _ := parseID(c.Param("id"))
		p, err := db.get(c.Request().Context(), id)
		switch {
		case errors.Is(err, errNoProduct):
			return jsonError(c, http.StatusNotFound, "Product not found")
		case err != nil:
			return unavailable(c, err)
		}
		return c.JSON(http.StatusOK, p)
	}, productID, item)
	get("/users/:id", func(c echo.Context) error {
		id, _, _ := parseID(c.Param("id"))
		u, ok := users[id]
		if !ok {
			return jsonError(c, http.StatusNotFound, "User not found")
		}
		return c.JSON(http.StatusOK, u)
	}, userID, user)
	// Who may write comes first: 401 and 403 before the ID or the body is
	// looked at.
	api.PUT("/products/:id", func(c echo.Context) error {
		id, _, _ := parseID(c.Param("id"))
		var in struct {
			Name  *string  `json:"name"`
			Price *float64 `json:"price"`
		}
		if err := decodeJSON(c, &in, true); err != nil {
			return bodyError(c, err, "Body must be a JSON object with an optional string name and number price")
		}
		if in.Name != nil && (*in.Name == "" || len(*in.Name) > maxProductName) || in.Price != nil && *in.Price < 0 {
			return jsonError(c, http.StatusBadRequest, "name must be 1-200 bytes and price not negative")
		}
		cs, err := redisecho.GetCache(c)
		if err != nil {
			return err
		}
		tags := []string{"product:" + strconv.Itoa(id), "products"}
		p, err := db.update(c.Request().Context(), id, in.Name, in.Price)
		switch {
		case errors.Is(err, errNoProduct):
			return jsonError(c, http.StatusNotFound, "Product not found")
		case err != nil:
			// The update may have run with its reply lost, and it can no
			// longer run later (update): invalidating now leaves no page
			// stale either way.
			_ = cs.InvalidateTags(c.Request().Context(), tags...)
			return unavailable(c, err)
		}
		if err := cs.InvalidateTags(c.Request().Context(), tags...); err != nil {
			// The data changed; stale pages would be served until their TTL.
			// Say so instead of pretending all is well.
			return echo.NewHTTPError(http.StatusServiceUnavailable, "updated, but the cache could not be invalidated").SetInternal(err)
		}
		return c.JSON(http.StatusOK, p)
	}, sessions, requireAdmin, productID, writes)
	return nil
}

// maxProductName bounds a product's name, in bytes.
const maxProductName = 200

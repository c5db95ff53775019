package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/labstack/echo/v4"
)

// Env is what a case sees of the harness. Each case gets its own copy.
type Env struct {
	// Redis is the address of the default Redis server.
	Redis string
	// KeyPrefix is unique to the case ("bench:<name>:"); every Redis key the
	// case writes must start with it.
	KeyPrefix string
	// BaseURL is the server's URL ("http://127.0.0.1:port"); set before
	// Setup is called, empty during Register.
	BaseURL string
	// HTTP is a client for Setup requests.
	HTTP *http.Client

	closers *[]func() error
}

// OnClose registers f to run when the harness stops (in reverse order).
func (env *Env) OnClose(f func() error) { *env.closers = append(*env.closers, f) }

// Do sends a request to the server under test and returns the response
// with its body read. A non-2xx status is an error.
func (env *Env) Do(ctx context.Context, method, path string, header http.Header) (*http.Response, []byte, error) {
	resp, body, err := env.Send(ctx, method, path, header)
	if err != nil {
		return nil, nil, err
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp, body, fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(body)))
	}
	return resp, body, nil
}

// Send is Do without the status check: any status is returned as is.
func (env *Env) Send(ctx context.Context, method, path string, header http.Header) (*http.Response, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, env.BaseURL+path, nil)
	if err != nil {
		return nil, nil, err
	}
	for k, vs := range header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	resp, err := env.HTTP.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, nil, err
	}
	return resp, body, nil
}

// keyPrefix derives a case's Redis key prefix from its name.
func keyPrefix(name string) string {
	var b strings.Builder
	b.WriteString("bench:")
	for _, r := range strings.ToLower(name) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '_' || r == '-' {
			b.WriteRune(r)
		} else {
			b.WriteByte('.')
		}
	}
	b.WriteByte(':')
	return b.String()
}

// Product is one item of the /p body.
type Product struct {
	ID       int      `json:"id"`
	SKU      string   `json:"sku"`
	Name     string   `json:"name"`
	Price    float64  `json:"price"`
	Currency string   `json:"currency"`
	InStock  bool     `json:"in_stock"`
	Stock    int      `json:"stock"`
	Tags     []string `json:"tags"`
}

var products = func() []Product {
	names := []string{
		"Espresso Cup", "Latte Glass", "Pour-Over Kettle", "Burr Grinder", "Milk Jug",
		"Coffee Scale", "Paper Filters", "Aeropress", "French Press", "Moka Pot",
		"Tamper", "Knock Box", "Cold Brew Jar", "Travel Mug", "Bean Canister",
		"Cleaning Tablets", "Descaler", "Dosing Cup", "Barista Towel", "Thermometer",
	}
	tags := [][]string{{"kitchen", "coffee"}, {"gift"}, {"coffee", "brewing", "sale"}}
	ps := make([]Product, len(names))
	for i, n := range names {
		ps[i] = Product{
			ID:       1001 + i,
			SKU:      fmt.Sprintf("SKU-%05d", 7300+i*17),
			Name:     n,
			Price:    float64(499+i*137) / 100,
			Currency: "EUR",
			InStock:  i%4 != 3,
			Stock:    (i * 37) % 120,
			Tags:     tags[i%len(tags)],
		}
	}
	return ps
}()

// handleN answers the /n body: {"ok":true}.
func handleN(c echo.Context) error {
	return c.JSON(http.StatusOK, struct {
		OK bool `json:"ok"`
	}{true})
}

// handleP answers the /p body: a 20-item product list.
func handleP(c echo.Context) error { return c.JSON(http.StatusOK, products) }

// baselineHandlers maps each baseline path to its handler; cases answer
// through the same handlers so bodies match.
var baselineHandlers = map[string]echo.HandlerFunc{"/n": handleN, "/p": handleP}

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/labstack/echo/v4"
)

// Body limits, each sized from the route's largest valid body: the most
// values the handler accepts, every byte of them written as a six-byte JSON
// escape (\u00XX), with room for the punctuation.
const (
	// maxLoginBody: a username and a password of up to 256 bytes each.
	maxLoginBody = 2*6*256 + 64
	// maxPreferencesBody: maxPreferences names and values at their
	// largest.
	maxPreferencesBody = maxPreferences*(6*(maxPreferenceName+maxPreferenceValue)+8) + 2
	// maxProductBody: a name of maxProductName bytes and a price.
	maxProductBody = 6*maxProductName + 128
)

// bodyLimits is the largest body of each route that takes one, by method and
// route path. Every other route takes none (0): a body there is refused
// with 413 before any handler runs.
var bodyLimits = map[string]int64{
	"POST /login":           maxLoginBody,
	"POST /api/auth/login":  maxLoginBody,
	"PUT /preferences":      maxPreferencesBody,
	"PUT /api/products/:id": maxProductBody,
	// The realtime routes (realtime.go).
	"POST /rooms/:room/messages": maxMessageBody,
	"POST /notifications":        maxMessageBody,
	"PUT /orders/:id/status":     maxOrderBody,
	"POST /api/emails":           maxEmailBody,
}

// limitBodies is the app's first middleware (after routing, so c.Path() is
// the route): a request whose Content-Length exceeds its route's limit gets
// 413 at once, and any other body is cut at the limit, which the handler
// then answers with 413 too (bodyError). Process memory per request is
// bounded by the limit; the server's ReadTimeout bounds how long a body may
// take.
func limitBodies(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		limit := bodyLimits[c.Request().Method+" "+c.Path()]
		req := c.Request()
		if req.ContentLength > limit {
			return tooLarge(c, limit)
		}
		if req.Body != nil && req.Body != http.NoBody {
			req.Body = http.MaxBytesReader(c.Response().Writer, req.Body, limit)
		}
		return next(c)
	}
}

func tooLarge(c echo.Context, limit int64) error {
	// The rest of the body is not read: the connection closes after the
	// response instead of being reused.
	c.Response().Header().Set(echo.HeaderConnection, "close")
	return jsonError(c, http.StatusRequestEntityTooLarge, fmt.Sprintf("Request body too large: this route takes at most %d bytes", limit))
}

// decodeJSON reads the request's body as one JSON value into dst; strict
// refuses unknown fields. Trailing data after the value is an error.
func decodeJSON(c echo.Context, dst any, strict bool) error {
	dec := json.NewDecoder(c.Request().Body)
	if strict {
		dec.DisallowUnknownFields()
	}
	if err := dec.Decode(dst); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			return err
		}
		return errors.New("trailing data after the JSON value")
	}
	return nil
}

// bodyError answers a body decodeJSON refused: 413 when it was cut at the
// route's limit, else 400 with msg.
func bodyError(c echo.Context, err error, msg string) error {
	var mb *http.MaxBytesError
	if errors.As(err, &mb) {
		return tooLarge(c, mb.Limit)
	}
	return jsonError(c, http.StatusBadRequest, msg)
}

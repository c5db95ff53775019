package main

// The guide's "Real-Time Features with Socket.IO" and "Pub/Sub for
// Real-Time Updates", over Server-Sent Events with redisecho's Hub: a chat
// in rooms, notifications to one user, and order updates to their user and
// to the admins. Every instance of the app publishes through the hub, so a
// browser connected to any instance receives what any other published.
//
//	GET  /events?rooms=a,b          the SSE stream of the rooms (1 to 15, each
//	                                1-64 of [A-Za-z0-9_-]), plus user:<id>
//	                                for a logged-in user; the admin room is
//	                                alice's only (403 for anyone else); 60
//	                                starts a minute per client
//	POST /rooms/:room/messages      {"text"} of 1-1000 characters: 202
//	                                {"id"}, event chat:message to the room
//	POST /notifications             {"userId","message"}, logged in: 202
//	                                {"id"}, event notification to user:<id>
//	PUT  /orders/:id/status         {"status"}, logged in: 200, event
//	                                order:updated to user:<id> and admin
//	GET  /rooms/:room/presence      {"room","count","members"}, every
//	                                instance's connections to the room
//	GET  /                          the demo page (static/, embedded)
//
// Channels are named after rooms ("lobby") and users ("user:2"); a room name
// has no ':', so the two never meet.

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"

	"github.com/redisecho/redisecho"
)

// Limits of the realtime routes.
const (
	// maxRooms is how many rooms one stream may join: the hub's default of
	// 16 channels per stream, less the user's own channel.
	maxRooms = 15
	// maxTextChars bounds a chat message and a notification, in
	// characters (Unicode code points).
	maxTextChars = 1000
	// maxMessageBody fits the longest valid message or notification:
	// maxTextChars characters, each written as the longest JSON escape of
	// one character (a surrogate pair, \uXXXX\uXXXX, 12 bytes), with room
	// for the punctuation and a user ID.
	maxMessageBody = 12*maxTextChars + 64
	// maxOrderBody fits the longest order status, escaped.
	maxOrderBody = 6*16 + 32
	// publishesPerMinute is how many messages, notifications and order
	// updates one client (a logged-in user, or an anonymous client
	// address) may publish per minute, the three routes together.
	publishesPerMinute = 30
	// streamsPerMinute is how many streams one client (a logged-in user,
	// or an anonymous client address) may start per minute, resumed or
	// not. Opening a stream writes nothing to Redis but its presence
	// entries (gone when it ends, or PresenceTTL after its instance dies),
	// so this bounds the work and the presence churn a reconnect loop can
	// cause; a page reconnects far less often (with backoff).
	streamsPerMinute = 60
	// joinsPerMinute is how many user:joined events one client's fresh
	// connections (no position) may publish per minute, one per room: a
	// publish creates the room's history, so this bounds the rooms a
	// client creates by joining as publishesPerMinute does by posting. A
	// connection whose rooms exceed what is left connects all the same,
	// silently, so a reconnect loop cannot flood a room's history. It is
	// maxRooms, so that one fresh connection to every room it may name is
	// announced.
	joinsPerMinute = maxRooms
	// adminRoom is the room of the admins: alice's only.
	adminRoom = "admin"
	// anonymous is the username of a visitor who is not logged in.
	anonymous = "anonymous"
)

// orderStatuses are the statuses PUT /orders/:id/status accepts.
var orderStatuses = map[string]bool{"pending": true, "paid": true, "shipped": true, "delivered": true, "cancelled": true}

// roomName is a valid room name.
var roomName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

//go:embed static
var staticFiles embed.FS

// userChannel is the channel of user id.
func userChannel(id int) string { return "user:" + strconv.Itoa(id) }

// realtime holds the hub and the limiters of the realtime routes.
type realtime struct {
	hub *redisecho.Hub
	// publishes limits POST /rooms/:room/messages, POST /notifications
	// and PUT /orders/:id/status, per user or client address.
	publishes echo.MiddlewareFunc
	// streams limits GET /events per user or client address.
	streams echo.MiddlewareFunc
	// joins limits the user:joined events per user or client address.
	joins   *redisecho.Limiter
	joinKey func(c echo.Context) (string, error)
	logger  *slog.Logger
}

// newRealtime builds the realtime part of the app. It does no I/O.
func newRealtime(client rueidis.Client, opts redisecho.Options) (*realtime, error) {
	hub, err := redisecho.NewHub(redisecho.HubConfig{Client: client, Options: opts})
	if err != nil {
		return nil, err
	}
	key := redisecho.UserOrIPKey(sessionUserID, redisecho.DefaultIPv6Prefix)
	publishes, err := redisecho.RateLimitConfig{
		Client:   client,
		Options:  opts,
		Name:     "realtime-publish",
		Policies: []redisecho.Policy{redisecho.PerMinute(publishesPerMinute)},
		KeyFunc:  key,
		// Without Redis nothing can be published anyway: 503.
		OnRedisError:         redisecho.FailClosed,
		DisableLegacyHeaders: true,
		Message:              map[string]string{"error": "Too many messages, please slow down."},
	}.ToMiddleware()
	if err != nil {
		return nil, err
	}
	streams, err := redisecho.RateLimitConfig{
		Client:   client,
		Options:  opts,
		Name:     "realtime-stream",
		Policies: []redisecho.Policy{redisecho.PerMinute(streamsPerMinute)},
		KeyFunc:  key,
		// Fail open: while Redis is down a stream creates nothing in it,
		// and one that starts catches up once Redis is back.
		OnRedisError:         redisecho.FailOpen,
		DisableLegacyHeaders: true,
		Message:              map[string]string{"error": "Too many connections, please try again later."},
	}.ToMiddleware()
	if err != nil {
		return nil, err
	}
	joins, err := redisecho.NewLimiter(redisecho.LimiterConfig{
		Client:       client,
		Options:      opts,
		Name:         "realtime-join",
		Policies:     []redisecho.Policy{redisecho.PerMinute(joinsPerMinute)},
		OnRedisError: redisecho.FailClosed,
	})
	if err != nil {
		return nil, err
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	return &realtime{hub: hub, publishes: publishes, streams: streams, joins: joins, joinKey: key, logger: logger}, nil
}

// mount adds the realtime routes to auth, the group behind the Session
// middleware, and the page to e.
func (rt *realtime) mount(e *echo.Echo, auth *echo.Group) error {
	events, err := redisecho.SSEConfig{
		Hub:       rt.hub,
		Channels:  streamChannels,
		Authorize: authorizeChannel,
		OnStart:   rt.announce,
	}.ToHandler()
	if err != nil {
		return err
	}
	auth.GET("/events", events, rt.streams)
	auth.POST("/rooms/:room/messages", rt.postMessage, checkRoom, rt.publishes)
	auth.GET("/rooms/:room/presence", rt.presence, checkRoom)
	auth.POST("/notifications", rt.postNotification, requireLogin, rt.publishes)
	auth.PUT("/orders/:id/status", rt.putOrderStatus, requireLogin, rt.publishes)

	// The page and its script, embedded in the binary.
	page := echo.StaticFileHandler("static/index.html", staticFiles)
	e.GET("/", page, pageHeaders)
	e.HEAD("/", page, pageHeaders)
	static := echo.StaticDirectoryHandler(echo.MustSubFS(staticFiles, "static"), false)
	e.GET("/static/*", static, pageHeaders)
	e.HEAD("/static/*", static, pageHeaders)
	return nil
}

// pageHeaders: the page loads nothing but its own files and talks to its
// own origin only, and is revalidated on each load (a new binary serves a
// new page).
func pageHeaders(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		h := c.Response().Header()
		h.Set("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")
		h.Set(echo.HeaderXContentTypeOptions, "nosniff")
		h.Set(echo.HeaderCacheControl, "no-cache")
		return next(c)
	}
}

// shutdown ends every stream; the server runs it (RegisterOnShutdown) when
// it starts shutting down, or open streams would hold its shutdown until
// its deadline.
func (rt *realtime) shutdown(within time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	_ = rt.hub.Shutdown(ctx)
}

// streamChannels are the channels of GET /events: the rooms of the query
// parameter "rooms" (comma-separated, in order), then the user's own
// channel when logged in. A stream needs at least one of them.
func streamChannels(c echo.Context) ([]string, error) {
	var channels []string
	if q := c.QueryParam("rooms"); q != "" {
		rooms := strings.SplitN(q, ",", maxRooms+1) // a long list costs no more
		if len(rooms) > maxRooms {
			return nil, badRequest(fmt.Sprintf("At most %d rooms per stream", maxRooms))
		}
		seen := make(map[string]bool, len(rooms))
		for _, r := range rooms {
			if !roomName.MatchString(r) {
				return nil, badRequest(roomNameRule)
			}
			if seen[r] {
				return nil, badRequest("Room " + r + " is listed twice")
			}
			seen[r] = true
			channels = append(channels, r)
		}
	}
	if _, id, ok := current(c); ok {
		channels = append(channels, userChannel(id))
	}
	if len(channels) == 0 {
		return nil, badRequest("Give the rooms to join: /events?rooms=lobby")
	}
	return channels, nil
}

// roomNameRule says what a room name is.
const roomNameRule = "Room names are 1-64 characters of A-Z, a-z, 0-9, _ and -"

// badRequest is a 400 with the app's JSON error body.
func badRequest(msg string) *echo.HTTPError {
	return echo.NewHTTPError(http.StatusBadRequest, map[string]string{"error": msg})
}

// authorizeChannel lets only alice read the admin room, and each user only
// their own user channel (streamChannels adds no other; this says so
// again, next to the rule for admin).
func authorizeChannel(c echo.Context, channel string) error {
	_, id, ok := current(c)
	switch {
	case channel == adminRoom && !(ok && id == adminUserID):
		return errors.New("the admin room is for admins only")
	case strings.HasPrefix(channel, "user:") && !(ok && channel == userChannel(id)):
		return errors.New("a user channel is for its user only")
	}
	return nil
}

// checkRoom answers 400 for a malformed room name and 403 for the admin
// room to anyone but alice, before the rate limiter counts the request.
func checkRoom(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		room := c.Param("room")
		if !roomName.MatchString(room) {
			return jsonError(c, http.StatusBadRequest, roomNameRule)
		}
		if err := authorizeChannel(c, room); err != nil {
			return c.JSON(http.StatusForbidden, map[string]string{"error": "forbidden", "channel": room})
		}
		return next(c)
	}
}

// requireLogin answers 401 without a logged-in user.
func requireLogin(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if _, _, ok := current(c); !ok {
			return jsonError(c, http.StatusUnauthorized, "Not authenticated")
		}
		return next(c)
	}
}

// username is the logged-in user's name, or "anonymous".
func username(c echo.Context) string {
	s, _, ok := current(c)
	if !ok {
		return anonymous
	}
	if name, ok := s.GetString("username"); ok && name != "" {
		return name
	}
	return anonymous
}

// validText reports whether s is 1 to maxTextChars characters.
func validText(s string) bool {
	n := utf8.RuneCountInString(s)
	return n >= 1 && n <= maxTextChars
}

// publish publishes data as event name on channel, within the request.
func (rt *realtime) publish(c echo.Context, channel, name string, data any) (redisecho.Position, error) {
	b, err := json.Marshal(data)
	if err != nil {
		return redisecho.Position{}, err
	}
	return rt.hub.Publish(c.Request().Context(), channel, redisecho.Event{Name: name, Data: b})
}

// unavailable answers a publish or presence call that failed: 503, and the
// cause in the log only.
func (rt *realtime) unavailable(c echo.Context, err error) error {
	rt.logger.Warn("realtime unavailable", "route", c.Path(), "error", err)
	return jsonError(c, http.StatusServiceUnavailable, "realtime unavailable")
}

// announce is the stream's OnStart: a fresh connection to a room (not
// resumed from a position, and not reset) publishes user:joined there, at
// most joinsPerMinute times per minute and client, each room counted. A
// resumed connection does not: its user never left.
func (rt *realtime) announce(c echo.Context, s redisecho.StreamStart) {
	var rooms []string
	for _, ch := range s.Channels {
		if !ch.Resumed && !ch.Reset && !strings.HasPrefix(ch.Channel, "user:") {
			rooms = append(rooms, ch.Channel)
		}
	}
	if len(rooms) == 0 {
		return
	}
	ctx := c.Request().Context()
	key, err := rt.joinKey(c)
	if err != nil {
		return
	}
	if d, err := rt.joins.AllowN(ctx, key, int64(len(rooms))); err != nil || !d.Allowed {
		return // limited, or Redis down: the stream goes on unannounced
	}
	name := username(c)
	for _, room := range rooms {
		data, _ := json.Marshal(map[string]string{"room": room, "username": name})
		if _, err := rt.hub.Publish(ctx, room, redisecho.Event{Name: "user:joined", Data: data}); err != nil {
			rt.logger.Warn("cannot announce a join", "room", room, "error", err)
		}
	}
}

// postMessage is POST /rooms/:room/messages: the guide's chat:message.
func (rt *realtime) postMessage(c echo.Context) error {
	var in struct {
		Text string `json:"text"`
	}
	if err := decodeJSON(c, &in, false); err != nil || !validText(in.Text) {
		return bodyError(c, err, "Body must be a JSON object with a text of 1-1000 characters")
	}
	room := c.Param("room")
	pos, err := rt.publish(c, room, "chat:message", map[string]string{
		"room":      room,
		"text":      in.Text,
		"username":  username(c),
		"timestamp": time.Now().UTC().Format(time.RFC3339),
	})
	if err != nil {
		return rt.unavailable(c, err)
	}
	return c.JSON(http.StatusAccepted, map[string]string{"id": pos.String()})
}

// postNotification is POST /notifications: the guide's sendNotification,
// from the logged-in user to one of the demo users.
func (rt *realtime) postNotification(c echo.Context) error {
	var in struct {
		UserID  int    `json:"userId"`
		Message string `json:"message"`
	}
	if err := decodeJSON(c, &in, false); err != nil || !validText(in.Message) {
		return bodyError(c, err, "Body must be a JSON object with a userId and a message of 1-1000 characters")
	}
	// Only known users: a channel per made-up ID would grow Redis without
	// bound.
	if !knownUser(in.UserID) {
		return jsonError(c, http.StatusBadRequest, "userId must be the ID of a user")
	}
	pos, err := rt.publish(c, userChannel(in.UserID), "notification", map[string]any{
		"userId":    in.UserID,
		"message":   in.Message,
		"from":      username(c),
		"timestamp": time.Now().UTC().Format(time.RFC3339),
	})
	if err != nil {
		return rt.unavailable(c, err)
	}
	return c.JSON(http.StatusAccepted, map[string]string{"id": pos.String()})
}

// knownUser reports whether id is a demo user's.
func knownUser(id int) bool {
	for _, u := range users {
		if u.id == id {
			return true
		}
	}
	return false
}

// putOrderStatus is PUT /orders/:id/status: the guide's updateOrderStatus
// and handleOrderUpdate, for an order of the logged-in user (the demo has
// no order table: any order ID is the user's). The update goes to the
// user's channel and to the admin room.
func (rt *realtime) putOrderStatus(c echo.Context) error {
	orderID, canonical, ok := parseID(c.Param("id"))
	if !ok || !canonical {
		return jsonError(c, http.StatusNotFound, "Order not found")
	}
	var in struct {
		Status string `json:"status"`
	}
	if err := decodeJSON(c, &in, false); err != nil || !orderStatuses[in.Status] {
		return bodyError(c, err, "Body must be a JSON object with a status: pending, paid, shipped, delivered or cancelled")
	}
	_, uid, _ := current(c)
	update := map[string]any{"orderId": orderID, "status": in.Status, "userId": uid}
	for _, channel := range []string{userChannel(uid), adminRoom} {
		if _, err := rt.publish(c, channel, "order:updated", update); err != nil {
			return rt.unavailable(c, err)
		}
	}
	return c.JSON(http.StatusOK, update)
}

// presence is GET /rooms/:room/presence: who is connected to the room, on
// every instance (the first 100).
func (rt *realtime) presence(c echo.Context) error {
	room := c.Param("room")
	p, err := rt.hub.Presence(c.Request().Context(), room, 100)
	if err != nil {
		return rt.unavailable(c, err)
	}
	members := p.Members
	if members == nil {
		members = []redisecho.Member{}
	}
	return c.JSON(http.StatusOK, map[string]any{"room": room, "count": p.Count, "members": members})
}

// endStreams is the middleware of /logout and /logout-all: once the user is
// logged out, their open streams end on every instance (hub.Disconnect),
// so that a revoked session stops receiving the user's events at once.
// Streams of the user's other sessions end too (Disconnect goes by user):
// their pages reconnect at once, from their position, and lose nothing.
// It runs whatever the logout answered: a logout that failed leaves the
// session, and its streams reconnect as before.
func (rt *realtime) endStreams(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		_, id, ok := current(c)
		err := next(c)
		if ok {
			if derr := rt.hub.Disconnect(c.Request().Context(), strconv.Itoa(id)); derr != nil {
				// The streams of a destroyed session end all the same at
				// their next session check (SSEConfig.AliveInterval).
				rt.logger.Warn("logout: cannot end the user's streams", "user", id, "error", derr)
			}
		}
		return err
	}
}

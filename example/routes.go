package main

import (
	"crypto/subtle"
	"errors"
	"net/http"
	"strconv"
	"strings"

	"github.com/labstack/echo/v4"

	"github.com/redisecho/redisecho"
)

// user is a demo account. A real app checks a password hash.
type user struct {
	id       int
	username string
	password string
}

var users = []user{
	{id: 1, username: "alice", password: "wonderland"},
	{id: 2, username: "bob", password: "builder"},
}

func authenticate(username, password string) (user, bool) {
	for _, u := range users {
		nameOK := subtle.ConstantTimeCompare([]byte(u.username), []byte(username)) == 1
		passOK := subtle.ConstantTimeCompare([]byte(u.password), []byte(password)) == 1
		if nameOK && passOK {
			return u, true
		}
	}
	return user{}, false
}

func jsonError(c echo.Context, code int, msg string) error {
	return c.JSON(code, map[string]string{"error": msg})
}

// login is the guide's POST /login, with the session regenerated against
// fixation and bound to the user for /sessions and /logout-all. A session
// bound to another user (bob logging in on alice's browser) starts empty:
// none of its values, alice's preferences included, carry over. An
// anonymous session keeps its values (the preferences a visitor chose
// before signing in).
func login(c echo.Context) error {
	var in struct {
		Username string `json:"username"`
		Password string `json:"password"`
	}
	if err := decodeJSON(c, &in, false); err != nil {
		return bodyError(c, err, "Invalid JSON body")
	}
	u, ok := authenticate(in.Username, in.Password)
	if !ok {
		return jsonError(c, http.StatusUnauthorized, "Invalid credentials")
	}
	s, err := redisecho.GetSession(c)
	if err != nil {
		return err
	}
	uid := strconv.Itoa(u.id)
	prev := s.UserID()
	if p, ok := s.GetInt("userId"); ok && prev == "" {
		prev = strconv.Itoa(p) // Express sessions have no binding: the value tells
	}
	if prev != "" && prev != uid {
		if err := s.Clear(); err != nil {
			return err
		}
	}
	bind := s.SetUserID(uid)
	if errors.Is(bind, redisecho.ErrNotInExpressMode) {
		bind = nil // the Express mode keeps only values
	}
	if err := errors.Join(
		s.Regenerate(),
		bind,
		s.Set("userId", u.id),
		s.Set("username", u.username),
		s.Set("isAuthenticated", true),
	); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]string{"message": "Login successful"})
}

// current returns the session and its user ID, or answers 401.
func current(c echo.Context) (*redisecho.SessionState, int, bool) {
	s, err := redisecho.GetSession(c)
	if err != nil {
		return nil, 0, false
	}
	if ok, _ := s.GetBool("isAuthenticated"); !ok {
		return s, 0, false
	}
	id, ok := s.GetInt("userId")
	return s, id, ok
}

func profile(c echo.Context) error {
	s, id, ok := current(c)
	if !ok {
		return jsonError(c, http.StatusUnauthorized, "Not authenticated")
	}
	name, _ := s.GetString("username")
	return c.JSON(http.StatusOK, map[string]any{"userId": id, "username": name})
}

func logout(c echo.Context) error {
	s, err := redisecho.GetSession(c)
	if err != nil {
		return err
	}
	if err := s.Destroy(); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]string{"message": "Logged out"})
}

func listSessions(c echo.Context) error {
	s, id, ok := current(c)
	if !ok {
		return jsonError(c, http.StatusUnauthorized, "Not authenticated")
	}
	list, err := s.Store().ListUserSessions(c.Request().Context(), strconv.Itoa(id))
	if errors.Is(err, redisecho.ErrNotInExpressMode) {
		return jsonError(c, http.StatusNotImplemented, "Not available while sessions are shared with the Express app: it keeps no list of a user's sessions")
	}
	if err != nil {
		return echo.NewHTTPError(http.StatusServiceUnavailable).SetInternal(err)
	}
	here := s.Handle()
	out := make([]map[string]any, 0, len(list))
	for _, us := range list {
		out = append(out, map[string]any{
			"handle": us.Handle, "created": us.Created, "lastSeen": us.LastSeen,
			"userAgent": us.UserAgent, "current": us.Handle == here,
		})
	}
	return c.JSON(http.StatusOK, map[string]any{"sessions": out})
}

func logoutAll(c echo.Context) error {
	s, id, ok := current(c)
	if !ok {
		return jsonError(c, http.StatusUnauthorized, "Not authenticated")
	}
	// The current session is kept out of the call and destroyed below, so
	// that the store can tell a lost index (other sessions may live on
	// unseen) from a user with no other session.
	n, err := s.Store().DestroyUserSessions(c.Request().Context(), strconv.Itoa(id), s.Handle())
	if errors.Is(err, redisecho.ErrNotInExpressMode) {
		return jsonError(c, http.StatusNotImplemented, "Not available while sessions are shared with the Express app: it keeps no list of a user's sessions; log out here, or on the Express app")
	}
	if errors.Is(err, redisecho.ErrSessionIndexMissing) {
		if err := s.Destroy(); err != nil {
			return err
		}
		return c.JSON(http.StatusInternalServerError, map[string]any{
			"error": "Could not log out everywhere: the list of your sessions was lost, so other sessions may still be signed in",
			"ended": n,
		})
	}
	if err != nil {
		return echo.NewHTTPError(http.StatusServiceUnavailable).SetInternal(err)
	}
	if err := s.Destroy(); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]any{"message": "Logged out everywhere", "ended": n + 1})
}

// Preference limits: a request merges at most this many keys, each name and
// value within these sizes (in bytes, decoded).
const (
	maxPreferences     = 50
	maxPreferenceName  = 64
	maxPreferenceValue = 1024
)

// putPreferences merges a JSON object into the session, one session value
// per key: two tabs changing different preferences at once both keep their
// change. A string sets a preference; null deletes it (as in a JSON merge
// patch, RFC 7396); anything else is a 400. Only the visitor's first write
// creates a session, and that is rate limited per client address
// (rateLimits.newSession).
func putPreferences(c echo.Context) error {
	var in map[string]*string
	if err := decodeJSON(c, &in, false); err != nil || in == nil {
		return bodyError(c, err, "Body must be a JSON object of strings (null deletes a preference)")
	}
	if len(in) > maxPreferences {
		return jsonError(c, http.StatusBadRequest, "Too many preferences in one request")
	}
	for k, v := range in {
		if k == "" || len(k) > maxPreferenceName || v != nil && len(*v) > maxPreferenceValue {
			return jsonError(c, http.StatusBadRequest, "Preference names must be 1-64 bytes and values at most 1 KiB")
		}
	}
	s, err := redisecho.GetSession(c)
	if err != nil {
		return err
	}
	// All or nothing: a request refused half-way (the session would grow
	// too large) changes nothing, so a 413 never hides a partial write,
	// and a visitor without a session gets none (the request is then not
	// counted as a creation, rightly).
	var done []prefChange
	for k, v := range in {
		ch := prefChange{key: "pref:" + k}
		ch.old, ch.had = s.GetString(ch.key)
		switch {
		case v == nil && !ch.had:
			continue // nothing to delete: no change, and no empty session
		case v == nil:
			err = s.Delete(ch.key)
		default:
			err = s.Set(ch.key, *v)
		}
		if err != nil {
			if uerr := undoPreferences(s, done); uerr != nil {
				return uerr
			}
			if errors.Is(err, redisecho.ErrSessionTooLarge) {
				return jsonError(c, http.StatusRequestEntityTooLarge, "Too many preferences")
			}
			return err
		}
		done = append(done, ch)
	}
	return getPreferences(c)
}

// prefChange is a preference putPreferences changed: its session key and
// the value it had (had false: none).
type prefChange struct {
	key string
	old string
	had bool
}

// undoPreferences takes back the changes done, newest first, so the
// session is as it was loaded; a new session is dropped instead, so that
// no empty session is created.
func undoPreferences(s *redisecho.SessionState, done []prefChange) error {
	if s.IsNew() {
		return s.Destroy()
	}
	for i := len(done) - 1; i >= 0; i-- {
		var err error
		if ch := done[i]; ch.had {
			err = s.Set(ch.key, ch.old)
		} else {
			err = s.Delete(ch.key)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func getPreferences(c echo.Context) error {
	s, err := redisecho.GetSession(c)
	if err != nil {
		return err
	}
	out := map[string]string{}
	for _, k := range s.Keys() {
		if name, ok := strings.CutPrefix(k, "pref:"); ok {
			out[name], _ = s.GetString(k)
		}
	}
	return c.JSON(http.StatusOK, out)
}

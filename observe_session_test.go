package redisecho

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/stretchr/testify/require"
)

// sessionObs is what a recorder saw of the session kinds.
type sessionObs struct {
	New, Invalid, Memory, Redis int64 // ObsSessionLoad, by result
	Stale                       int64 // ObsSessionStaleBypass
	Saved, SaveFailed           int64 // ObsSessionSave, by result
	Errors                      int64 // ObsSessionError
}

func sessionObsOf(rec *recorder) sessionObs {
	return sessionObs{
		New: rec.count(ObsSessionLoad, ResultNew), Invalid: rec.count(ObsSessionLoad, ResultInvalid),
		Memory: rec.count(ObsSessionLoad, ResultMemory), Redis: rec.count(ObsSessionLoad, ResultRedis),
		Stale: rec.count(ObsSessionStaleBypass, ResultNone),
		Saved: rec.count(ObsSessionSave, ResultOK), SaveFailed: rec.count(ObsSessionSave, ResultError),
		Errors: rec.count(ObsSessionError, ResultNone),
	}
}

// requireSessionObs requires that rec saw exactly want of the session
// kinds, each observation with N = 1, no Name and no other result. The
// observations are made on the request's goroutine before the response
// goes out, so they are all there once the client has the response.
func requireSessionObs(t *testing.T, rec *recorder, want sessionObs, msg string) {
	t.Helper()
	got := sessionObsOf(rec)
	require.Equal(t, want, got, "%s\n%s", msg, rec.dump())
	for _, k := range []ObsKind{ObsSessionLoad, ObsSessionSave, ObsSessionStaleBypass, ObsSessionError} {
		for _, o := range rec.of(k) {
			require.Equal(t, int64(1), o.N, "%v", o)
			require.Empty(t, o.Name, "%v", o)
			require.Zero(t, o.Path, "%v", o)
		}
	}
	require.Equal(t, got.New+got.Invalid+got.Memory+got.Redis, rec.count(ObsSessionLoad, ResultNone), "no other load result")
	require.Equal(t, got.Saved+got.SaveFailed, rec.count(ObsSessionSave, ResultNone), "no other save result")
}

// requireStatsAgree requires that the store's counters tell what its
// observer saw (for a store whose requests carried at most one valid
// cookie, so that a read is one load).
func requireStatsAgree(t *testing.T, st *SessionStore, rec *recorder) {
	t.Helper()
	o, s := sessionObsOf(rec), st.Stats()
	require.Equal(t, uint64(o.Saved), s.Saves, "Stats.Saves")
	require.Equal(t, uint64(o.SaveFailed), s.SaveErrors, "Stats.SaveErrors")
	require.Equal(t, uint64(o.Stale), s.StaleBypasses, "Stats.StaleBypasses")
	if st.x == nil {
		require.Equal(t, uint64(o.Memory), s.CacheHits, "Stats.CacheHits")
	}
}

// readAfterWrite accounts in want for a read right after this instance
// wrote the session: its cached copy is invalidated already (a miss) or
// older than the cookie (a stale bypass), so the read is ResultRedis with
// at most one stale bypass, never ResultMemory.
func readAfterWrite(t *testing.T, rec *recorder, want *sessionObs) {
	t.Helper()
	want.Redis++
	got := sessionObsOf(rec)
	require.Contains(t, []int64{want.Stale, want.Stale + 1}, got.Stale, rec.dump())
	want.Stale = got.Stale
}

// sessionTracer is a Tracer that records every span and how it ended.
type sessionTracer struct {
	*recorder
	mu     sync.Mutex
	spans  []Span
	ends   []error // one per ended span, in order of ending
	open   int
	double int // spans ended more than once
}

func (tr *sessionTracer) StartSpan(ctx context.Context, s Span) (context.Context, func(error)) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.spans = append(tr.spans, s)
	tr.open++
	done := false
	return ctx, func(err error) {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		if done {
			tr.double++
			return
		}
		done = true
		tr.open--
		tr.ends = append(tr.ends, err)
	}
}

func (tr *sessionTracer) InjectTrace(context.Context) string { return "" }

// saves requires every span started so far to be a session save that
// ended exactly once, and returns how many there are and their errors in
// order.
func (tr *sessionTracer) saves(t *testing.T) (int, []error) {
	t.Helper()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	require.Zero(t, tr.open, "every span ended")
	require.Zero(t, tr.double, "no span ended twice")
	require.Len(t, tr.ends, len(tr.spans))
	for _, sp := range tr.spans {
		require.Equal(t, Span{Op: SpanSessionSave}, sp)
	}
	return len(tr.spans), append([]error(nil), tr.ends...)
}

// openBreakerFor opens br (Failures: 1) for every scope key may be under.
func openBreakerFor(t *testing.T, br *Breaker, b *backend, key string) {
	t.Helper()
	for _, scope := range []string{"redis", "cluster"} {
		br.record(br.node(scope), unhealthy)
	}
	br.record(br.node(waitSlotMap(t, b, key)), unhealthy)
}

// sessionKeyOf is the Redis key of the session the browser's cookie names.
func sessionKeyOf(t *testing.T, b *browser, app *sessionApp) string {
	t.Helper()
	tok, _, _, ok := app.store.decodeCookie(DefaultSessionCookie, b.cookie(app))
	require.True(t, ok)
	return app.store.key(tok)
}

// TestObserveSessionLoadsAndSaves: each read of a session by the
// middleware is one ObsSessionLoad saying where the session came from,
// each save one ObsSessionSave; a request that never touches its session
// reads nothing and reports nothing.
func TestObserveSessionLoadsAndSaves(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		recA, recB := newRecorder(), newRecorder()
		a := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.Observer = recA })
		b := newBrowser(t)
		var want sessionObs

		require.Equal(t, http.StatusOK, b.get(a, "/untouched").code)
		requireSessionObs(t, recA, want, "a handler that does not use the session reads none")

		found, _ := valueOf(t, b.get(a, "/get?k=n"))
		require.False(t, found)
		want.New++
		requireSessionObs(t, recA, want, "no cookie: a new session, read with no I/O")

		require.Equal(t, http.StatusOK, b.post(a, "/set?k=n&v=1").code)
		want.New++
		want.Saved++
		requireSessionObs(t, recA, want, "a new session, then its creation")

		_, v := valueOf(t, b.get(a, "/get?k=n"))
		require.Equal(t, "1", v)
		want.Redis++
		requireSessionObs(t, recA, want, "first read on this client: a round trip")
		for range 3 {
			_, v = valueOf(t, b.get(a, "/get?k=n"))
			require.Equal(t, "1", v)
			want.Memory++
		}
		requireSessionObs(t, recA, want, "unchanged: served by client-side caching")
		require.Equal(t, http.StatusOK, b.get(a, "/untouched").code)
		requireSessionObs(t, recA, want, "a cookie the handler does not use is not read")

		// A second instance with its own client: its first read of the
		// session is a round trip, then it serves it from its cache.
		other := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.Observer = recB })
		b.setCookie(other, b.cookie(a))
		_, v = valueOf(t, b.get(other, "/get?k=n"))
		require.Equal(t, "1", v)
		_, v = valueOf(t, b.get(other, "/get?k=n"))
		require.Equal(t, "1", v)
		requireSessionObs(t, recB, sessionObs{Redis: 1, Memory: 1}, "instance B")
		requireSessionObs(t, recA, want, "B's reads are B's")

		// A changes it (the read is A's cached copy); B's next read goes to
		// Redis: its copy is either invalidated already (a miss) or older
		// than the cookie (a stale bypass), never served from memory.
		require.Equal(t, http.StatusOK, b.post(a, "/set?k=n&v=2").code)
		want.Memory++
		want.Saved++
		requireSessionObs(t, recA, want, "a write after a cached read")
		syncCookie(b, []*sessionApp{a, other}, a)
		_, v = valueOf(t, b.get(other, "/get?k=n"))
		require.Equal(t, "2", v, "read your writes")
		gotB := sessionObsOf(recB)
		require.LessOrEqual(t, gotB.Stale, int64(1), recB.dump())
		requireSessionObs(t, recB, sessionObs{Redis: 2, Memory: 1, Stale: gotB.Stale}, "B's read after A's write")

		// Regeneration with a login (index and save: one save), then a
		// destroy (one save, no read).
		require.Equal(t, http.StatusOK, b.post(a, "/login?user=u1").code)
		readAfterWrite(t, recA, &want)
		want.Saved++
		requireSessionObs(t, recA, want, "a login")
		require.Equal(t, http.StatusNoContent, b.post(a, "/destroy").code)
		want.Saved++
		requireSessionObs(t, recA, want, "a destroy reads nothing")
		found, _ = valueOf(t, b.get(a, "/get?k=n"))
		require.False(t, found)
		want.New++
		requireSessionObs(t, recA, want, "the cookie was cleared: a new session")

		requireStatsAgree(t, a.store, recA)
		requireStatsAgree(t, other.store, recB)
	})
}

// TestObserveSessionInvalidCookie: a cookie that fails its signature or
// format check is ResultInvalid (and a new session); one that verifies but
// names no session is ResultNew, after its round trip.
func TestObserveSessionInvalidCookie(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		rec := newRecorder()
		app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.Observer = rec })
		owner := newBrowser(t)
		require.Equal(t, http.StatusOK, owner.post(app, "/set?k=n&v=1").code)
		good := owner.cookie(app)
		parts := strings.Split(good, ".")
		require.Len(t, parts, 4)
		foreign, err := NewSessionStore(SessionConfig{Client: r.Client(), Keys: []string{strings.Repeat("z", 32)}})
		require.NoError(t, err)
		tok := token{tag: parts[0], secret: parts[1]}
		want := sessionObs{New: 1, Saved: 1}
		requireSessionObs(t, rec, want, "the owner's session")

		for _, bad := range []string{
			"garbage",
			parts[0] + "." + parts[1] + "." + parts[2] + "." + strings.Repeat("A", 22), // tampered MAC
			parts[0] + "." + parts[1] + ".99." + parts[3],                              // tampered version
			foreign.encodeCookie(DefaultSessionCookie, tok, 1),                         // a key not in the ring
		} {
			b := newBrowser(t)
			b.setCookie(app, bad)
			rep := b.get(app, "/get?k=n")
			found, _ := valueOf(t, rep)
			require.False(t, found)
			require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=0")
			want.Invalid++
			requireSessionObs(t, rec, want, bad)
		}

		// An invalid cookie, then a value set: the new session is saved.
		b := newBrowser(t)
		b.setCookie(app, "garbage")
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=x&v=y").code)
		want.Invalid++
		want.Saved++
		requireSessionObs(t, rec, want, "invalid, then a new session saved")
		_, v := valueOf(t, b.get(app, "/get?k=x"))
		require.Equal(t, "y", v)
		want.Redis++
		requireSessionObs(t, rec, want, "the replacement session")

		// A valid cookie of an unknown session: read, found nothing.
		b = newBrowser(t)
		b.setCookie(app, app.store.encodeCookie(DefaultSessionCookie, newToken(""), 1))
		found, _ := valueOf(t, b.get(app, "/get?k=n"))
		require.False(t, found)
		want.New++
		requireSessionObs(t, rec, want, "no session behind a valid cookie")
		requireStatsAgree(t, app.store, rec)
	})
}

// TestObserveSessionStaleBypass: a cached copy older than the cookie's
// version is bypassed (ObsSessionStaleBypass) and the read is ResultRedis.
func TestObserveSessionStaleBypass(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		rec := newRecorder()
		app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.Observer = rec })
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		_, v := valueOf(t, b.get(app, "/get?k=n"))
		require.Equal(t, "1", v)
		_, v = valueOf(t, b.get(app, "/get?k=n"))
		require.Equal(t, "1", v)
		want := sessionObs{New: 1, Saved: 1, Redis: 1, Memory: 1}
		requireSessionObs(t, rec, want, "cached")

		// The cookie claims a version newer than any copy (as a write on
		// another instance whose invalidation has not arrived would): the
		// cached copy is bypassed on every read, and Redis answers.
		tok, version, _, ok := app.store.decodeCookie(DefaultSessionCookie, b.cookie(app))
		require.True(t, ok)
		b.setCookie(app, app.store.encodeCookie(DefaultSessionCookie, tok, version+5))
		for range 2 {
			_, v = valueOf(t, b.get(app, "/get?k=n"))
			require.Equal(t, "1", v)
			want.Stale++
			want.Redis++
		}
		requireSessionObs(t, rec, want, "stale copies bypassed")
		requireStatsAgree(t, app.store, rec)
	})
}

// TestObserveSessionRedisFailure: a read that Redis fails is
// ObsSessionError (no ObsSessionLoad), answered 503 or, under Degrade,
// run with an empty session; a save that fails is ObsSessionSave with
// ResultError. The breaker stands in for a failing Redis.
func TestObserveSessionRedisFailure(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		for _, degrade := range []bool{false, true} {
			rec := newRecorder()
			br := NewBreaker(BreakerConfig{Failures: 1, Cooldown: time.Hour, Logger: discardLogger()})
			app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) {
				cfg.Observer, cfg.Breaker, cfg.Degrade = rec, br, degrade
			})
			b := newBrowser(t)
			require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
			want := sessionObs{New: 1, Saved: 1}
			openBreakerFor(t, br, app.store.b, sessionKeyOf(t, b, app))

			rep := b.get(app, "/get?k=n")
			if degrade {
				found, _ := valueOf(t, rep)
				require.False(t, found, "degraded: an empty session")
			} else {
				require.Equal(t, http.StatusServiceUnavailable, rep.code)
			}
			want.Errors++
			requireSessionObs(t, rec, want, "a failed read")

			// A delete writes without reading: the save itself fails.
			rep = b.post(app, "/delete?k=n")
			if degrade {
				require.Equal(t, http.StatusNoContent, rep.code)
			} else {
				require.Equal(t, http.StatusServiceUnavailable, rep.code)
			}
			want.SaveFailed++
			requireSessionObs(t, rec, want, "a failed save")

			// A set reads first: the read fails, and nothing is saved.
			rep = b.post(app, "/set?k=n&v=2")
			if !degrade {
				require.Equal(t, http.StatusServiceUnavailable, rep.code)
			}
			want.Errors++
			requireSessionObs(t, rec, want, "a write whose read failed is not saved")
			requireStatsAgree(t, app.store, rec)
		}
	})
}

// TestObserveSessionRedisPaused: with Redis frozen, a save times out
// (ResultError), a read that needs a round trip times out
// (ObsSessionError), and an extension of the idle timeout that fails is a
// failed save too, though the response stands.
func TestObserveSessionRedisPaused(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		rec := newRecorder()
		clock := newFakeClock()
		br := NewBreaker(BreakerConfig{Failures: 1000, Logger: discardLogger()})
		mod := func(cfg *SessionConfig) {
			cfg.Observer, cfg.Breaker, cfg.Clock, cfg.Timeout = rec, br, clock, 200*time.Millisecond
		}
		app := newSessionApp(t, f.testRedis, f.Client(), mod)
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		_, v := valueOf(t, b.get(app, "/get?k=n")) // cached from now on
		require.Equal(t, "1", v)
		want := sessionObs{New: 1, Saved: 1, Redis: 1}
		requireSessionObs(t, rec, want, "before")
		fresh := newSessionApp(t, f.testRedis, f.Client(), mod) // its own client: nothing cached
		b.setCookie(fresh, b.cookie(app))

		f.Pause(t)
		// TouchAfter passed: the read is served from memory, its
		// extension times out; the response is the handler's.
		clock.Advance(10 * time.Minute)
		_, v = valueOf(t, b.get(app, "/get?k=n"))
		require.Equal(t, "1", v)
		want.Memory++
		want.SaveFailed++
		requireSessionObs(t, rec, want, "a failed extension")

		rep := b.post(app, "/delete?k=n")
		require.Equal(t, http.StatusServiceUnavailable, rep.code)
		want.SaveFailed++
		requireSessionObs(t, rec, want, "a failed save")

		rep = b.get(fresh, "/get?k=n")
		require.Equal(t, http.StatusServiceUnavailable, rep.code)
		want.Errors++
		requireSessionObs(t, rec, want, "a failed read")
		f.Resume(t)
	})
}

// TestObserveSessionTouch: a read that extends the idle timeout is a
// read and a save.
func TestObserveSessionTouch(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		rec := newRecorder()
		clock := newFakeClock()
		app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.Observer, cfg.Clock = rec, clock })
		b := newBrowser(t)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		_, _ = valueOf(t, b.get(app, "/get?k=n"))
		want := sessionObs{New: 1, Saved: 1, Redis: 1}
		requireSessionObs(t, rec, want, "before")
		clock.Advance(10 * time.Minute) // a third of the anonymous idle timeout
		_, v := valueOf(t, b.get(app, "/get?k=n"))
		require.Equal(t, "1", v)
		want.Memory++ // read before the extension wrote
		want.Saved++
		requireSessionObs(t, rec, want, "an extension")
		requireStatsAgree(t, app.store, rec)
	})
}

// TestObserveSessionSpans: each save that writes is one SpanSessionSave,
// ended once with the save's error; reads have none.
func TestObserveSessionSpans(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		tr := &sessionTracer{recorder: newRecorder()}
		clock := newFakeClock()
		br := NewBreaker(BreakerConfig{Failures: 1, Cooldown: time.Hour, Logger: discardLogger()})
		app := newSessionApp(t, r, r.Client(), func(cfg *SessionConfig) { cfg.Observer, cfg.Clock, cfg.Breaker = tr, clock, br })
		b := newBrowser(t)
		spans := func() int { n, _ := tr.saves(t); return n }

		_, _ = valueOf(t, b.get(app, "/get?k=n"))
		require.Equal(t, 0, spans(), "a read of a new session")
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		require.Equal(t, 1, spans(), "a creation")
		for range 3 {
			_, _ = valueOf(t, b.get(app, "/get?k=n"))
		}
		require.Equal(t, 1, spans(), "reads have none")
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=2").code)
		require.Equal(t, 2, spans(), "an update")
		require.Equal(t, http.StatusOK, b.post(app, "/login?user=u1").code)
		require.Equal(t, 3, spans(), "a login: its index write and its save are one save")
		clock.Advance(40 * time.Minute) // past TouchAfter of the bound session's 2 h
		_, _ = valueOf(t, b.get(app, "/get?k=n"))
		require.Equal(t, 4, spans(), "an extension")
		_, ends := tr.saves(t)
		for _, err := range ends {
			require.NoError(t, err)
		}
		require.Equal(t, int64(4), sessionObsOf(tr.recorder).Saved)

		openBreakerFor(t, br, app.store.b, sessionKeyOf(t, b, app))
		require.Equal(t, http.StatusServiceUnavailable, b.post(app, "/delete?k=n").code)
		require.Equal(t, 5, spans(), "a failed save")
		_, ends = tr.saves(t)
		require.ErrorIs(t, ends[4], ErrBreakerOpen, "ended with the save's error")
		require.Equal(t, http.StatusServiceUnavailable, b.get(app, "/get?k=n").code)
		require.Equal(t, 5, spans(), "a failed read has none")
	})
}

// expressObsApp is a Go app in Express mode with routes to read, set,
// delete and destroy, and its store.
func expressObsApp(t *testing.T, cfg ExpressSessionConfig) *sessionApp {
	t.Helper()
	store, err := NewExpressSessionStore(cfg)
	require.NoError(t, err)
	e := echo.New()
	e.HideBanner = true
	e.Use(store.Middleware())
	e.GET("/get", func(c echo.Context) error {
		s, _ := GetSession(c)
		var v any
		ok, err := s.Get(c.QueryParam("k"), &v)
		if err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]any{"found": ok, "value": v})
	})
	e.POST("/set", func(c echo.Context) error {
		s, _ := GetSession(c)
		if err := s.Set(c.QueryParam("k"), c.QueryParam("v")); err != nil {
			return err
		}
		return c.JSON(http.StatusOK, map[string]string{"ok": "yes"})
	})
	e.POST("/delete", func(c echo.Context) error {
		s, _ := GetSession(c)
		if err := s.Delete(c.QueryParam("k")); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	e.POST("/regenerate", func(c echo.Context) error {
		s, _ := GetSession(c)
		if err := s.Regenerate(); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	e.POST("/destroy", func(c echo.Context) error {
		s, _ := GetSession(c)
		if err := s.Destroy(); err != nil {
			return err
		}
		return c.NoContent(http.StatusNoContent)
	})
	e.GET("/untouched", func(c echo.Context) error { return c.String(http.StatusOK, "static") })
	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)
	return &sessionApp{store: store, srv: srv}
}

// expressKeyOf is the Redis key of the Express session the browser's
// cookie names.
func expressKeyOf(t *testing.T, b *browser, app *sessionApp) string {
	t.Helper()
	id, ok := app.store.x.unsign(b.cookie(app))
	require.True(t, ok, b.cookie(app))
	return app.store.x.prefix + id
}

// TestObserveSessionExpress: the Express mode reports its reads (always
// round trips: it reads without client-side caching), its saves (a
// touch is one, as in the native mode) and its spans.
func TestObserveSessionExpress(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		tr := &sessionTracer{recorder: newRecorder()}
		rec := tr.recorder
		br := NewBreaker(BreakerConfig{Failures: 1, Cooldown: time.Hour, Logger: discardLogger()})
		cfg := guideExpressConfig(r, client)
		cfg.Observer, cfg.Breaker, cfg.Logger = tr, br, discardLogger()
		app := expressObsApp(t, cfg)
		b := newBrowser(t)
		var want sessionObs
		spans := func() int { n, _ := tr.saves(t); return n }

		require.Equal(t, http.StatusOK, b.get(app, "/untouched").code)
		found, _ := valueOf(t, b.get(app, "/get?k=n"))
		require.False(t, found)
		want.New++
		requireSessionObs(t, rec, want, "no cookie")
		require.Equal(t, 0, spans())

		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		want.New++
		want.Saved++
		requireSessionObs(t, rec, want, "a new session saved")
		require.Equal(t, 1, spans())

		for range 2 {
			_, v := valueOf(t, b.get(app, "/get?k=n"))
			require.Equal(t, "1", v)
			want.Redis++
		}
		requireSessionObs(t, rec, want, "Express reads are round trips")
		require.Equal(t, 1, spans(), "reads have no span")

		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=2").code)
		want.Redis++
		want.Saved++
		requireSessionObs(t, rec, want, "an update")
		require.Equal(t, http.StatusNoContent, b.post(app, "/regenerate").code)
		want.Redis++
		want.Saved++
		requireSessionObs(t, rec, want, "a regeneration (two writes) is one save")
		require.Equal(t, 3, spans())

		// Express's touch: once a quarter of the TTL has passed.
		key := expressKeyOf(t, b, app)
		ctx := context.Background()
		require.NoError(t, client.Do(ctx, client.B().Pexpire().Key(key).Milliseconds((12*time.Hour).Milliseconds()).Build()).Error())
		_, v := valueOf(t, b.get(app, "/get?k=n"))
		require.Equal(t, "2", v)
		want.Redis++
		want.Saved++
		requireSessionObs(t, rec, want, "a touch")
		require.Equal(t, 4, spans())
		ms, err := client.Do(ctx, client.B().Pttl().Key(key).Build()).AsInt64()
		require.NoError(t, err)
		require.Greater(t, time.Duration(ms)*time.Millisecond, 23*time.Hour, "the touch wrote")

		// A tampered cookie: invalid, a new session.
		bad := newBrowser(t)
		bad.setCookie(app, "s%3Anot-signed.AAAA")
		found, _ = valueOf(t, bad.get(app, "/get?k=n"))
		require.False(t, found)
		want.Invalid++
		requireSessionObs(t, rec, want, "a tampered cookie")

		// A failed read, a failed save.
		openBreakerFor(t, br, app.store.b, key)
		require.Equal(t, http.StatusServiceUnavailable, b.get(app, "/get?k=n").code)
		want.Errors++
		requireSessionObs(t, rec, want, "a failed read")
		require.Equal(t, http.StatusServiceUnavailable, b.post(app, "/destroy").code)
		want.SaveFailed++
		requireSessionObs(t, rec, want, "a failed destroy")
		n, ends := tr.saves(t)
		require.Equal(t, 5, n)
		require.ErrorIs(t, ends[4], ErrBreakerOpen, "ended with the save's error")
		for _, err := range ends[:4] {
			require.NoError(t, err)
		}
		requireStatsAgree(t, app.store, rec)
	})
}

// TestObserveSessionGorilla: the gorilla store reports its reads and
// saves as the middleware does.
func TestObserveSessionGorilla(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		tr := &sessionTracer{recorder: newRecorder()}
		rec := tr.recorder
		app := newGorillaApp(t, r, r.Client(), DefaultSessionCookie, func(cfg *SessionConfig) { cfg.Observer = tr })
		b := newBrowser(t)
		me := func() map[string]any {
			rep := b.get(app.sessionApp, "/g/me")
			require.Equal(t, http.StatusOK, rep.code, rep.body)
			var out map[string]any
			require.NoError(t, json.Unmarshal([]byte(rep.body), &out))
			return out
		}
		require.Equal(t, true, me()["isNew"])
		want := sessionObs{New: 1}
		requireSessionObs(t, rec, want, "no cookie")

		require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/set?k=a&v=1").code)
		want.New++
		want.Saved++
		requireSessionObs(t, rec, want, "a creation")
		require.Equal(t, false, me()["isNew"])
		require.Equal(t, false, me()["isNew"])
		want.Redis++
		want.Memory++
		requireSessionObs(t, rec, want, "reads")
		require.Equal(t, http.StatusOK, b.post(app.sessionApp, "/g/set?k=a&v=2").code)
		want.Memory++
		want.Saved++
		requireSessionObs(t, rec, want, "an update")
		require.Equal(t, http.StatusNoContent, b.post(app.sessionApp, "/g/logout").code)
		readAfterWrite(t, rec, &want)
		want.Saved++
		requireSessionObs(t, rec, want, "a delete")

		bad := newBrowser(t)
		bad.setCookie(app.sessionApp, "garbage")
		rep := bad.get(app.sessionApp, "/g/me")
		require.Equal(t, http.StatusOK, rep.code)
		want.Invalid++
		requireSessionObs(t, rec, want, "a tampered cookie")

		n, ends := tr.saves(t)
		require.Equal(t, 3, n, "one span per save")
		for _, err := range ends {
			require.NoError(t, err)
		}
		requireStatsAgree(t, app.store, rec)
	})
}

// TestObserveSessionNoObserver: without an observer the paths run as
// before (the lazy read of a session without a cookie included).
func TestObserveSessionNoObserver(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		require.Nil(t, app.store.b.obs)
		b := newBrowser(t)
		found, _ := valueOf(t, b.get(app, "/get?k=n"))
		require.False(t, found)
		require.Equal(t, http.StatusOK, b.post(app, "/set?k=n&v=1").code)
		_, v := valueOf(t, b.get(app, "/get?k=n"))
		require.Equal(t, "1", v)
		require.Equal(t, uint64(1), app.store.Stats().Saves)

		bad := newBrowser(t)
		bad.setCookie(app, "garbage")
		rep := bad.post(app, "/regenerate")
		require.Equal(t, http.StatusNoContent, rep.code)
		require.Contains(t, rep.header.Get("Set-Cookie"), "Max-Age=0", "a bad cookie is still cleared")
		require.Equal(t, uint64(1), app.store.Stats().Saves)
	})
}

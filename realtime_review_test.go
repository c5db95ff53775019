package redisecho

// Review tests of realtime.go: each proves one bug found in review (it
// failed before its fix) and stays as its regression test.

import (
	"bufio"
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// reviewFrame is one SSE event as a client reads it.
type reviewFrame struct{ event, id, data string }

// reviewStream is an open SSE response read frame by frame in the
// background, so a test can wait for a frame with a deadline.
type reviewStream struct {
	resp   *http.Response
	frames chan reviewFrame
}

func openReviewStream(t *testing.T, url string, header map[string]string) *reviewStream {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	require.NoError(t, err)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := &reviewStream{resp: resp, frames: make(chan reviewFrame, 1024)}
	t.Cleanup(func() { resp.Body.Close() })
	go func() {
		defer close(s.frames)
		br := bufio.NewReader(resp.Body)
		var f reviewFrame
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			line = strings.TrimRight(line, "\n")
			switch {
			case line == "":
				if f.event != "" || f.data != "" {
					s.frames <- f
				}
				f = reviewFrame{}
			case strings.HasPrefix(line, "event: "):
				f.event = line[7:]
			case strings.HasPrefix(line, "id: "):
				f.id = line[4:]
			case strings.HasPrefix(line, "data: "):
				f.data += line[6:]
			}
		}
	}()
	return s
}

// next returns the next frame, failing after a generous deadline.
func (s *reviewStream) next(t *testing.T) reviewFrame {
	t.Helper()
	select {
	case f, ok := <-s.frames:
		require.True(t, ok, "stream ended")
		return f
	case <-time.After(10 * time.Second):
		t.Fatal("no frame within 10s")
		return reviewFrame{}
	}
}

// nextEvent skips reset events and returns the next other frame.
func (s *reviewStream) nextEvent(t *testing.T) reviewFrame {
	t.Helper()
	for {
		if f := s.next(t); f.event != DefaultResetEvent {
			return f
		}
	}
}

// newReviewHub returns a hub on its own client and an HTTP server with its
// SSE endpoint at /events (channels from ?channels=, user from ?user=).
func newReviewHub(t *testing.T, r *testRedis, cfg HubConfig) (*Hub, *httptest.Server) {
	t.Helper()
	cfg.Client = r.Client()
	cfg.Options.Prefix = r.Keys.Prefix()
	h, err := NewHub(cfg)
	require.NoError(t, err)
	e := echo.New()
	e.GET("/events", SSEWithConfig(SSEConfig{
		Hub:    h,
		UserID: func(c echo.Context) string { return c.QueryParam("user") },
	}))
	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = h.Shutdown(ctx)
	})
	return h, srv
}

// waitPublished waits until hub h has delivered a channel's event at
// offset off (so it is in sync with Redis there).
func waitSynced(t *testing.T, h *Hub, channel string, off uint64) {
	t.Helper()
	require.Eventually(t, func() bool {
		h.mu.Lock()
		ch := h.chans[channel]
		h.mu.Unlock()
		if ch == nil {
			return false
		}
		ch.mu.Lock()
		defer ch.mu.Unlock()
		return ch.synced && ch.pos.Offset >= off
	}, 10*time.Second, 5*time.Millisecond)
}

// A Disconnect that starts a user channel's new epoch (its meta hash
// evicted, or expired after MetaTTL without a publish, or Redis restarted
// without persistence) still ends the user's streams. Before the fix the
// hub reset the user channel straight to the new epoch's top, skipping
// the Disconnect: the logged-out user's stream stayed open.
func TestReviewDisconnectStartingANewEpochEndsStreams(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		h, srv := newReviewHub(t, r, HubConfig{})
		// An earlier logout gave u1's channel a history (epoch E1).
		require.NoError(t, h.Disconnect(ctx, "u1"))
		s := openReviewStream(t, srv.URL+"/events?channels=room&user=u1", nil)
		waitSynced(t, h, userChannel("u1"), 1)
		_, err := h.Publish(ctx, "room", Event{Name: "m", Data: []byte("one")})
		require.NoError(t, err)
		require.Equal(t, "one", s.nextEvent(t).data, "the stream is open")

		// The history is lost; the next Disconnect starts epoch E2.
		admin := r.Client()
		require.NoError(t, admin.Do(ctx, admin.B().Del().Key(h.keysOf(userChannel("u1")).meta).Build()).Error())
		require.NoError(t, h.Disconnect(ctx, "u1"))
		f := s.nextEvent(t)
		require.Equal(t, "disconnect", f.event)
		require.JSONEq(t, `{"reason":"disconnected"}`, f.data)
	})
}

// gateWriter is an http.ResponseWriter whose writes block while its gate
// is closed: a client that stops reading, without the kernel buffers that
// make one hard to time on loopback. It ignores deadlines (a fault a real
// connection does not produce on cue, so it is injected).
type gateWriter struct {
	hdr     http.Header
	mu      sync.Mutex
	buf     bytes.Buffer
	open    chan struct{} // closed: writes pass
	blocked chan struct{} // a write is waiting at the gate
}

func newGateWriter() *gateWriter {
	g := &gateWriter{hdr: http.Header{}, open: make(chan struct{}), blocked: make(chan struct{}, 1)}
	close(g.open)
	return g
}

func (g *gateWriter) Header() http.Header { return g.hdr }
func (g *gateWriter) WriteHeader(int)     {}
func (g *gateWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	open := g.open
	g.mu.Unlock()
	select {
	case <-open:
	default:
		select {
		case g.blocked <- struct{}{}:
		default:
		}
		<-open
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.buf.Write(p)
}
func (g *gateWriter) Flush()                           {}
func (g *gateWriter) SetWriteDeadline(time.Time) error { return nil }
func (g *gateWriter) SetReadDeadline(time.Time) error  { return nil }
func (g *gateWriter) close()                           { g.mu.Lock(); g.open = make(chan struct{}); g.mu.Unlock() }
func (g *gateWriter) release()                         { g.mu.Lock(); close(g.open); g.mu.Unlock() }
func (g *gateWriter) text() string                     { g.mu.Lock(); defer g.mu.Unlock(); return g.buf.String() }
func (g *gateWriter) has(s string) func() bool {
	return func() bool { return strings.Contains(g.text(), s) }
}

// oldEpoch returns the epoch of hub h's last position on channel.
func oldEpoch(t *testing.T, h *Hub, channel string) string {
	t.Helper()
	h.mu.Lock()
	ch := h.chans[channel]
	h.mu.Unlock()
	require.NotNil(t, ch)
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.pos.Epoch
}

// loseHistory deletes channel's meta hash (its epoch and counter), publishes
// into the new epoch that starts, and waits until hub h moved to it (it
// queued the reset).
func loseHistory(t *testing.T, h *Hub, admin rueidis.Client, channel string) {
	t.Helper()
	ctx := context.Background()
	old := oldEpoch(t, h, channel)
	require.NoError(t, admin.Do(ctx, admin.B().Del().Key(h.keysOf(channel).meta).Build()).Error())
	_, err := h.Publish(ctx, channel, Event{Name: "m", Data: []byte("lost")})
	require.NoError(t, err)
	waitNewEpoch(t, h, channel, old)
}

// waitBlocked waits until the handler blocks writing to w.
func (w *gateWriter) waitBlocked(t *testing.T) {
	t.Helper()
	select {
	case <-w.blocked:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler did not write")
	}
}

// waitNewEpoch waits until hub h moved channel to an epoch other than old
// (it queued the reset).
func waitNewEpoch(t *testing.T, h *Hub, channel, old string) {
	t.Helper()
	require.Eventually(t, func() bool { return oldEpoch(t, h, channel) != old }, 10*time.Second, 5*time.Millisecond)
}

// parseFrames splits SSE text into its events.
func parseFrames(text string) []reviewFrame {
	var out []reviewFrame
	for _, block := range strings.Split(text, "\n\n") {
		var f reviewFrame
		for _, line := range strings.Split(block, "\n") {
			switch {
			case strings.HasPrefix(line, "event: "):
				f.event = line[7:]
			case strings.HasPrefix(line, "id: "):
				f.id = line[4:]
			case strings.HasPrefix(line, "data: "):
				f.data += line[6:]
			}
		}
		if f.event != "" || f.data != "" {
			out = append(out, f)
		}
	}
	return out
}

// A stream the server ends still writes what was queued before the end,
// and a reset among it must be written too: the events after it are of a
// new epoch, and without the reset the client's ID would move to that
// epoch silently (a gap it can never detect). Before the fix the last
// write skipped queued resets.
func TestReviewEndWritesQueuedReset(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		h, err := NewHub(HubConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		t.Cleanup(func() { _ = h.Shutdown(context.Background()) })
		w := newGateWriter()
		rctx, cancel := context.WithCancel(ctx)
		defer cancel()
		req := httptest.NewRequest(http.MethodGet, "/events", nil).WithContext(rctx)
		served := make(chan error, 1)
		go func() { served <- h.Serve(w, req, Stream{Channels: []string{"room"}, UserID: "u1"}) }()
		require.Eventually(t, w.has(": connected"), 10*time.Second, 5*time.Millisecond)

		_, err = h.Publish(ctx, "room", Event{Name: "m", Data: []byte("one")})
		require.NoError(t, err)
		require.Eventually(t, w.has("data: one"), 10*time.Second, 5*time.Millisecond)

		// The client stops reading: the handler blocks writing "two".
		w.close()
		_, err = h.Publish(ctx, "room", Event{Name: "m", Data: []byte("two")})
		require.NoError(t, err)
		w.waitBlocked(t)
		// Meanwhile the room's history is lost and restarts: a reset, then
		// "three" of the new epoch, are queued; then the user is logged out.
		admin := r.Client()
		loseHistory(t, h, admin, "room")
		_, err = h.Publish(ctx, "room", Event{Name: "m", Data: []byte("three")})
		require.NoError(t, err)
		require.Eventually(t, func() bool { return h.Stats().Delivered >= 3 }, 10*time.Second, 5*time.Millisecond)
		require.NoError(t, h.Disconnect(ctx, "u1"))
		require.Eventually(t, func() bool {
			h.mu.Lock()
			defer h.mu.Unlock()
			for c := range h.clients {
				c.mu.Lock()
				ended := c.ended
				c.mu.Unlock()
				return ended
			}
			return false
		}, 10*time.Second, 5*time.Millisecond)
		w.release()
		select {
		case err := <-served:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not return")
		}

		var names []string
		for _, f := range parseFrames(w.text()) {
			names = append(names, f.event+":"+f.data)
		}
		require.Equal(t, []string{"m:one", "m:two", "reset:{\"channels\":[\"room\"]}", "m:three", "disconnect:{\"reason\":\"disconnected\"}"}, names)
	})
}

// A reset queued behind a slow write is written before the new epoch's
// events queued after it, not after the whole batch (the client would
// otherwise show the new epoch's first events, then throw its state away).
func TestReviewQueuedResetPrecedesItsEvents(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		h, err := NewHub(HubConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		t.Cleanup(func() { _ = h.Shutdown(context.Background()) })
		w := newGateWriter()
		rctx, cancel := context.WithCancel(ctx)
		defer cancel()
		req := httptest.NewRequest(http.MethodGet, "/events", nil).WithContext(rctx)
		go func() { _ = h.Serve(w, req, Stream{Channels: []string{"room"}}) }()
		require.Eventually(t, w.has(": connected"), 10*time.Second, 5*time.Millisecond)

		w.close()
		_, err = h.Publish(ctx, "room", Event{Name: "m", Data: []byte("one")})
		require.NoError(t, err)
		w.waitBlocked(t)
		admin := r.Client()
		loseHistory(t, h, admin, "room")
		_, err = h.Publish(ctx, "room", Event{Name: "m", Data: []byte("two")})
		require.NoError(t, err)
		require.Eventually(t, func() bool { return h.Stats().Delivered >= 2 }, 10*time.Second, 5*time.Millisecond)
		w.release()
		require.Eventually(t, w.has("data: two"), 10*time.Second, 5*time.Millisecond)

		var names []string
		for _, f := range parseFrames(w.text()) {
			names = append(names, f.event+":"+f.data)
		}
		require.Equal(t, []string{"m:one", "reset:{\"channels\":[\"room\"]}", "m:two"}, names)
	})
}

// A stream the server ends in the middle of its replay (Shutdown, a
// Disconnect, a session that ended) still gets its last "disconnect"
// event, with the position it reached: every stream the server ends does.
// Before the fix the handler returned without it.
func TestReviewEndDuringReplayWritesLastEvent(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		h, err := NewHub(HubConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		var first Position
		for i := 0; i < 250; i++ {
			p, err := h.Publish(ctx, "room", Event{Name: "m", Data: []byte("x")})
			require.NoError(t, err)
			if i == 0 {
				first = p
			}
		}
		id := string(appendStreamID(nil, []string{channelHash("room")}, []Position{first}))

		w := newGateWriter()
		w.close() // the client reads nothing yet
		req := httptest.NewRequest(http.MethodGet, "/events", nil)
		served := make(chan error, 1)
		go func() { served <- h.Serve(w, req, Stream{Channels: []string{"room"}, LastEventID: id}) }()
		w.waitBlocked(t)
		shut := make(chan error, 1)
		go func() { shut <- h.Shutdown(ctx) }()
		require.Eventually(t, func() bool {
			h.mu.Lock()
			defer h.mu.Unlock()
			for c := range h.clients {
				c.mu.Lock()
				defer c.mu.Unlock()
				return c.ended
			}
			return true
		}, 10*time.Second, 5*time.Millisecond)
		w.release()
		select {
		case err := <-served:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not return")
		}
		require.NoError(t, <-shut)

		frames := parseFrames(w.text())
		require.NotEmpty(t, frames)
		last := frames[len(frames)-1]
		require.Equal(t, "disconnect", last.event)
		require.JSONEq(t, `{"reason":"shutdown"}`, last.data)
		require.NotEmpty(t, last.id)
	})
}

// Shutdown with Redis paused (SIGSTOP) finishes within a few Timeouts:
// the subscription connection that cannot unsubscribe is closed, not
// handed back to rueidis's pool, whose clean-up waits without a deadline
// until the dead connection is detected. Before the fix Shutdown took 12 s
// with a Timeout of 200 ms.
func TestReviewShutdownWithRedisPaused(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		timeout := 200 * time.Millisecond
		h, srv := newReviewHub(t, f.testRedis, HubConfig{Options: Options{Timeout: timeout}})
		s := openReviewStream(t, srv.URL+"/events?channels=room,other&user=u1", nil)
		_, err := h.Publish(context.Background(), "room", Event{Data: []byte("x")})
		require.NoError(t, err)
		require.Equal(t, "x", s.nextEvent(t).data)
		f.Pause(t)
		defer f.Resume(t)
		ctx, cancel := context.WithTimeout(context.Background(), 25*timeout) // 5 s
		defer cancel()
		require.NoError(t, h.Shutdown(ctx), "Shutdown finishes while Redis is paused")
		last := s.nextEvent(t)
		require.Equal(t, "disconnect", last.event)
		require.JSONEq(t, `{"reason":"shutdown"}`, last.data)
	})
}

// Opening streams writes nothing that outlives them: a client that opens
// streams to channels nobody publishes to (any name its Authorize lets
// through, 16 per request) must not grow Redis. Before the fix each such
// channel got a meta hash that lived MetaTTL (24 h), so a loop of
// requests with fresh names grew Redis without bound, although the README
// says only publishing creates channel state. A channel with no history
// now has the placeholder epoch "000000" in stream IDs, and the events of
// its first epoch reach open and resuming streams without a reset.
func TestReviewStreamsToUnpublishedChannelsLeaveNoKeys(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		h, srv := newReviewHub(t, r, HubConfig{UnsubscribeGrace: 10 * time.Millisecond})
		admin := r.Client()
		var names []string
		for i := 0; i < 16; i++ {
			names = append(names, "ghost-"+strconv.Itoa(i))
		}
		s := openReviewStream(t, srv.URL+"/events?user=u9&channels="+strings.Join(names, ","), nil)
		s.resp.Body.Close()
		require.Eventually(t, func() bool { return h.Stats().Connections == 0 }, 10*time.Second, 5*time.Millisecond)
		for _, name := range append(names, userChannel("u9")) {
			k := h.keysOf(name)
			require.Eventually(t, func() bool {
				n, err := admin.Do(ctx, admin.B().Exists().Key(k.meta).Build()).AsInt64()
				require.NoError(t, err)
				m, err := admin.Do(ctx, admin.B().Exists().Key(k.presence).Build()).AsInt64()
				require.NoError(t, err)
				return n+m == 0
			}, 10*time.Second, 10*time.Millisecond, "no key of %q is left", name)
		}

		// The first epoch of such a channel loses nothing: an open stream
		// gets its first events (and no reset), a stream resuming from the
		// no-history position gets them replayed.
		live := openReviewStream(t, srv.URL+"/events?channels=fresh", nil)
		waitSynced(t, h, "fresh", 0)
		_, err := h.Publish(ctx, "fresh", Event{Name: "m", Data: []byte("a")})
		require.NoError(t, err)
		f := live.next(t)
		require.Equal(t, "a", f.data, "no reset before the first event")
		require.Zero(t, h.Stats().Rereads, "the first event of a history is delivered live, without a re-read")

		h2, srv2 := newReviewHub(t, r, HubConfig{})
		_ = h2
		before := openReviewStream(t, srv2.URL+"/events?channels=other", nil)
		waitSynced(t, h2, "other", 0)
		_, err = h.Publish(ctx, "other", Event{Name: "m", Data: []byte("b1")})
		require.NoError(t, err)
		first := before.next(t)
		require.Equal(t, "b1", first.data)
		before.resp.Body.Close()
		// An ID from before the first publish resumes from the start.
		noHistory := string(appendStreamID(nil, []string{channelHash("other")}, []Position{{Epoch: noEpoch}}))
		_, err = h.Publish(ctx, "other", Event{Name: "m", Data: []byte("b2")})
		require.NoError(t, err)
		resumed := openReviewStream(t, srv.URL+"/events?channels=other", map[string]string{"Last-Event-ID": noHistory})
		require.Equal(t, "b1", resumed.next(t).data)
		require.Equal(t, "b2", resumed.next(t).data)
	})
}

// Every stream the server accepts can resume from its own IDs: a
// MaxChannels whose IDs the decoder refuses (more than 64 entries, or
// more than MaxStreamIDLength bytes) is a configuration error. Before the
// fix MaxChannels 70 was accepted, its IDs were ignored on reconnect, and
// a reconnecting client silently missed what was published meanwhile.
func TestReviewEveryAcceptedStreamCanResume(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		for _, n := range []int{maxStreamIDEntries, 70} {
			cfg := HubConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}}
			h, err := NewHub(cfg)
			require.NoError(t, err)
			t.Cleanup(func() { _ = h.Shutdown(context.Background()) })
			handler, err := SSEConfig{Hub: h, MaxChannels: n}.ToHandler()
			if err != nil {
				require.Greater(t, n, maxStreamIDEntries, "MaxChannels %d must be accepted", n)
				err = h.Serve(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil), Stream{Channels: []string{"a"}, MaxChannels: n})
				require.Error(t, err, "Serve refuses it too")
				continue
			}
			e := echo.New()
			e.GET("/events", handler)
			srv := httptest.NewServer(e)
			t.Cleanup(srv.Close)
			var names []string
			for i := 0; i < n; i++ {
				names = append(names, "c"+strconv.Itoa(n)+"-"+strconv.Itoa(i))
			}
			url := srv.URL + "/events?channels=" + strings.Join(names, ",")
			s := openReviewStream(t, url, nil)
			waitSynced(t, h, names[n-1], 0)
			for _, name := range names {
				_, err := h.Publish(ctx, name, Event{Name: "m", Data: []byte(name + "-1")})
				require.NoError(t, err)
			}
			var last string
			for range names {
				last = s.next(t).id
			}
			s.resp.Body.Close()
			_, err = h.Publish(ctx, names[n-1], Event{Name: "m", Data: []byte("missed")})
			require.NoError(t, err)
			t.Logf("MaxChannels %d: resuming from an ID of %d bytes", n, len(last))
			resumed := openReviewStream(t, url, map[string]string{"Last-Event-ID": last})
			require.Equal(t, "missed", resumed.next(t).data, "MaxChannels %d: the client resumes from its last ID (%d bytes)", n, len(last))
		}
	})
}

// A client switching to an instance that has not yet seen the first
// events of a channel's first epoch (it synced while the channel had no
// history) resumes from its position with neither a reset nor duplicates,
// as it does when that instance lags within an epoch.
func TestReviewSwitchToInstanceBehindFirstEpoch(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		// One partition: one worker for both channels, on a cluster too.
		ha, srvA := newReviewHub(t, r, HubConfig{Partitions: 1})
		hb, srvB := newReviewHub(t, r, HubConfig{Partitions: 1})
		onA := openReviewStream(t, srvA.URL+"/events?channels=room,other", nil)
		_ = onA
		waitSynced(t, ha, "room", 0)
		waitSynced(t, ha, "other", 0)

		// A's worker stalls on "other": A lags behind on "room".
		ha.mu.Lock()
		other := ha.chans["other"]
		ha.mu.Unlock()
		other.mu.Lock()
		locked := true
		defer func() {
			if locked {
				other.mu.Unlock()
			}
		}()
		_, err := hb.Publish(ctx, "other", Event{Name: "m", Data: []byte("o1")})
		require.NoError(t, err)

		onB := openReviewStream(t, srvB.URL+"/events?channels=room", nil)
		waitSynced(t, hb, "room", 0)
		for _, d := range []string{"r1", "r2"} {
			_, err := hb.Publish(ctx, "room", Event{Name: "m", Data: []byte(d)})
			require.NoError(t, err)
		}
		require.Equal(t, "r1", onB.next(t).data)
		last := onB.next(t)
		require.Equal(t, "r2", last.data)
		onB.resp.Body.Close()

		// The client switches to A, which still has "room" at no history.
		s := openReviewStream(t, srvA.URL+"/events?channels=room", map[string]string{"Last-Event-ID": last.id})
		ha.mu.Lock()
		room := ha.chans["room"]
		ha.mu.Unlock()
		require.Eventually(t, func() bool { // the stream is planned
			room.mu.Lock()
			defer room.mu.Unlock()
			return len(room.subs) == 2
		}, 10*time.Second, 5*time.Millisecond)
		other.mu.Unlock()
		locked = false
		_, err = hb.Publish(ctx, "room", Event{Name: "m", Data: []byte("r3")})
		require.NoError(t, err)
		f := s.next(t)
		require.Equal(t, "m", f.event, "no reset: the client missed nothing")
		require.Equal(t, "r3", f.data, "no duplicate")
	})
}

// countWriter is an http.ResponseWriter that keeps nothing of what it is
// sent (so the test measures the hub's memory, not a client's).
type countWriter struct {
	hdr http.Header
	n   atomic.Int64
}

func (w *countWriter) Header() http.Header              { return w.hdr }
func (w *countWriter) WriteHeader(int)                  {}
func (w *countWriter) Write(p []byte) (int, error)      { w.n.Add(int64(len(p))); return len(p), nil }
func (w *countWriter) Flush()                           {}
func (w *countWriter) SetWriteDeadline(time.Time) error { return nil }
func (w *countWriter) SetReadDeadline(time.Time) error  { return nil }

func heapInuse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// An idle stream holds no copy of the events it wrote: one large event
// broadcast to many streams does not leave each of them with a buffer of
// its size. Before the fix every stream kept a write buffer of up to
// 64 KiB after a large event, for as long as it stayed open (twice the
// whole idle stream's budget).
func TestReviewIdleStreamsKeepNoLargeBuffers(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		h, err := NewHub(HubConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}})
		require.NoError(t, err)
		t.Cleanup(func() { _ = h.Shutdown(context.Background()) })
		const streams = 200
		ws := make([]*countWriter, streams)
		for i := range ws {
			ws[i] = &countWriter{hdr: http.Header{}}
			req := httptest.NewRequest(http.MethodGet, "/events", nil).WithContext(ctx)
			go func(w *countWriter) { _ = h.Serve(w, req, Stream{Channels: []string{"room"}}) }(ws[i])
		}
		require.Eventually(t, func() bool { return h.Stats().Connections == streams }, 10*time.Second, 5*time.Millisecond)
		require.Eventually(t, func() bool {
			for _, w := range ws {
				if w.n.Load() == 0 {
					return false
				}
			}
			return true
		}, 10*time.Second, 5*time.Millisecond)
		waitSynced(t, h, "room", 0)
		before := heapInuse()

		const size = 48 << 10
		_, err = h.Publish(ctx, "room", Event{Name: "m", Data: bytes.Repeat([]byte("x"), size)})
		require.NoError(t, err)
		require.Eventually(t, func() bool {
			for _, w := range ws {
				if w.n.Load() < size {
					return false
				}
			}
			return true
		}, 10*time.Second, 5*time.Millisecond)
		grown := int64(heapInuse()) - int64(before)
		t.Logf("heap grew by %d KiB for %d idle streams after one %d KiB event", grown>>10, streams, size>>10)
		require.Less(t, grown, int64(streams*size/10), "idle streams keep no copy of the event")
	})
}

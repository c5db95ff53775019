package redisecho

// Behaviour tests of the realtime hub and its SSE endpoint (issue 11), on a
// real standalone server and a real 3-master cluster. Every simulated
// instance is a Hub with its own rueidis client behind its own HTTP server;
// clients are real HTTP SSE streams read by the small parser below.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// rtWait is the generous deadline of anything the tests wait for: an event,
// the end of a stream, a count that settles. Slow CI stays far below it.
const rtWait = 10 * time.Second

// ---------------------------------------------------------------------------
// The SSE client

// sseEvent is one dispatched SSE event.
type sseEvent struct {
	Name string // "message" when the frame had no event field
	ID   string
	Data string // the data lines joined by "\n"
}

// sseStream is an open SSE response read in the background.
type sseStream struct {
	Resp   *http.Response
	events chan sseEvent
	done   chan struct{} // closed when the body ended
	err    error         // why it ended, valid after done
	cancel context.CancelFunc

	heartbeats atomic.Int64 // ": hb" comments seen
	retry      atomic.Value // the last "retry:" value, a string
	last       string       // the id of the last event Next returned
	start      atomic.Value // the id of the stream's first block, a string
}

// readSSE parses the event stream of r until it ends, calling comment for
// each comment line, field for "retry", and event for each dispatched
// event. It follows the WHATWG parsing rules the tests need: "field: value"
// with one optional space, a blank line dispatches an event that has data
// (a block with only an id, like a stream's first one, sets no event but
// does set the id a browser resumes from: event gets it as an event
// without a Name, which Next keeps from the tests), CRLF, LF or CR endings.
func readSSE(r *bufio.Reader, comment func(string), retry func(string), event func(sseEvent)) error {
	var ev sseEvent
	var data []string
	seen := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		switch {
		case line == "":
			switch {
			case data != nil:
				if ev.Name == "" {
					ev.Name = "message"
				}
				ev.Data = strings.Join(data, "\n")
				event(ev)
			case seen && ev.ID != "":
				event(sseEvent{ID: ev.ID}) // an id alone: no event, a position
			}
			ev, data, seen = sseEvent{}, nil, false
		case line[0] == ':':
			comment(strings.TrimPrefix(line[1:], " "))
		default:
			name, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			switch name {
			case "event":
				ev.Name, seen = value, true
			case "id":
				ev.ID, seen = value, true
			case "data":
				data, seen = append(data, value), true
			case "retry":
				retry(value)
			}
		}
	}
}

// openSSE opens url as an event stream with the given request headers,
// requires a 200 text/event-stream answer and waits for the ": connected"
// comment, so that the stream is live when it returns. It is closed when the
// test ends.
func openSSE(t *testing.T, url string, header http.Header) *sseStream {
	t.Helper()
	return openSSEWith(t, http.DefaultClient, url, header)
}

// openSSEWith is openSSE through hc (a client with a cookie jar, say).
func openSSEWith(t *testing.T, hc *http.Client, url string, header http.Header) *sseStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	require.NoError(t, err)
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		cancel()
		require.NoError(t, err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		cancel()
		require.Equal(t, http.StatusOK, resp.StatusCode, "GET %s: %s", url, body)
	}
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	s := &sseStream{Resp: resp, events: make(chan sseEvent, 1<<16), done: make(chan struct{}), cancel: cancel}
	s.retry.Store("")
	connected := make(chan struct{})
	var once sync.Once
	go func() {
		defer close(s.done)
		defer once.Do(func() {})
		s.err = readSSE(bufio.NewReader(resp.Body), func(c string) {
			switch c {
			case "hb":
				s.heartbeats.Add(1)
			case "connected":
				once.Do(func() { close(connected) })
			}
		}, func(r string) { s.retry.Store(r) }, func(ev sseEvent) {
			if ev.Name == "" { // an id alone: the stream's start position
				s.start.Store(ev.ID)
				return
			}
			s.events <- ev
		})
	}()
	t.Cleanup(s.Close)
	select {
	case <-connected:
	case <-s.done:
		t.Fatalf("GET %s: the stream ended before \": connected\": %v", url, s.err)
	case <-time.After(rtWait):
		t.Fatalf("GET %s: no \": connected\" within %v", url, rtWait)
	}
	return s
}

// Close ends the stream from the client's side and waits for its reader.
func (s *sseStream) Close() {
	s.cancel()
	_ = s.Resp.Body.Close()
	<-s.done
}

// LastID is the id of the last event Next returned, or before any the
// stream's start position: where a browser that processed the events so
// far resumes.
func (s *sseStream) LastID() string {
	if s.last == "" {
		id, _ := s.start.Load().(string)
		return id
	}
	return s.last
}

// Next returns the next event, failing the test when none comes within
// rtWait or the stream ends first.
func (s *sseStream) Next(t *testing.T) sseEvent {
	t.Helper()
	ev := s.next(t)
	if ev.ID != "" {
		s.last = ev.ID
	}
	return ev
}

func (s *sseStream) next(t *testing.T) sseEvent {
	t.Helper()
	select {
	case ev := <-s.events:
		return ev
	default:
	}
	select {
	case ev := <-s.events:
		return ev
	case <-s.done:
		select {
		case ev := <-s.events:
			return ev
		default:
		}
		t.Fatalf("the stream ended while an event was expected: %v", s.err)
	case <-time.After(rtWait):
		t.Fatalf("no event within %v", rtWait)
	}
	return sseEvent{}
}

// Data reads the next n events and returns their data.
func (s *sseStream) Data(t *testing.T, n int) []string {
	t.Helper()
	out := make([]string, 0, n)
	for range n {
		out = append(out, s.Next(t).Data)
	}
	return out
}

// Until reads events until one whose data is want, and returns the data of
// all of them, want included.
func (s *sseStream) Until(t *testing.T, want string) []string {
	t.Helper()
	var out []string
	for {
		ev := s.Next(t)
		out = append(out, ev.Data)
		if ev.Data == want {
			return out
		}
	}
}

// End waits for the server to end the stream and returns the events it sent
// before that.
func (s *sseStream) End(t *testing.T) []sseEvent {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(rtWait):
		t.Fatalf("the server did not end the stream within %v", rtWait)
	}
	var out []sseEvent
	for {
		select {
		case ev := <-s.events:
			out = append(out, ev)
		default:
			return out
		}
	}
}

// Quiet asserts that no event is waiting. It is used after a marker event
// that must be the last one, so it needs no wait of its own.
func (s *sseStream) Quiet(t *testing.T) {
	t.Helper()
	select {
	case ev := <-s.events:
		t.Fatalf("unexpected event %+v", ev)
	default:
	}
}

// ---------------------------------------------------------------------------
// Hubs and apps

// newTestHub returns a hub on client under r's prefix with short intervals,
// shut down when the test ends.
func newTestHub(t *testing.T, r *testRedis, client rueidis.Client, mod func(*HubConfig)) *Hub {
	t.Helper()
	cfg := HubConfig{
		Client:           client,
		Options:          Options{Prefix: r.Keys.Prefix(), Logger: rtLogger()},
		Partitions:       4,
		UnsubscribeGrace: 100 * time.Millisecond,
		PresenceInterval: 200 * time.Millisecond,
	}
	if mod != nil {
		mod(&cfg)
	}
	h, err := NewHub(cfg)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = h.Shutdown(ctx)
	})
	return h
}

// rtLogger discards the hubs' logs unless REDISECHO_TEST_LOG is set.
func rtLogger() *slog.Logger {
	if os.Getenv("REDISECHO_TEST_LOG") != "" {
		return slog.Default()
	}
	return discardLogger()
}

// rtApp is one application instance: an Echo app serving GET /events with
// SSEWithConfig on a real HTTP server.
type rtApp struct {
	*httptest.Server
	Hub    *Hub
	Starts chan StreamStart // what OnStart reported, in order
	Active atomic.Int64     // /events handlers running now
}

// newRTApp serves hub at /events. The user of a request is its X-User
// header. mod changes the SSE config, srv the http.Server before it starts.
func newRTApp(t *testing.T, hub *Hub, mod func(*SSEConfig), srv func(*http.Server)) *rtApp {
	t.Helper()
	app := &rtApp{Hub: hub, Starts: make(chan StreamStart, 256)}
	cfg := SSEConfig{
		Hub:    hub,
		UserID: func(c echo.Context) string { return c.Request().Header.Get("X-User") },
		Retry:  time.Second,
		OnStart: func(_ echo.Context, s StreamStart) {
			select {
			case app.Starts <- s:
			default:
			}
		},
	}
	if mod != nil {
		mod(&cfg)
	}
	h, err := cfg.ToHandler()
	require.NoError(t, err)
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.GET("/events", func(c echo.Context) error {
		app.Active.Add(1)
		defer app.Active.Add(-1)
		return h(c)
	})
	app.Server = httptest.NewUnstartedServer(e)
	if srv != nil {
		srv(app.Server.Config)
	}
	app.Start()
	t.Cleanup(func() {
		app.CloseClientConnections()
		app.Close()
	})
	return app
}

// events returns the URL of a stream of channels, with extra query pairs.
func (a *rtApp) events(channels []string, extra ...string) string {
	q := url.Values{"channels": {strings.Join(channels, ",")}}
	for i := 0; i+1 < len(extra); i += 2 {
		q.Set(extra[i], extra[i+1])
	}
	return a.URL + "/events?" + q.Encode()
}

// open opens a stream (openSSE) and returns what OnStart reported for it.
func (a *rtApp) open(t *testing.T, url string, hdr http.Header) (*sseStream, StreamStart) {
	t.Helper()
	for len(a.Starts) > 0 {
		<-a.Starts
	}
	s := openSSE(t, url, hdr)
	return s, a.start(t)
}

// start returns what OnStart reported for the next stream.
func (a *rtApp) start(t *testing.T) StreamStart {
	t.Helper()
	select {
	case s := <-a.Starts:
		return s
	case <-time.After(rtWait):
		t.Fatal("OnStart was not called")
	}
	return StreamStart{}
}

// header builds request headers from name/value pairs.
func header(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Set(kv[i], kv[i+1])
	}
	return h
}

// publish publishes data under name and returns its position.
func publish(t *testing.T, h *Hub, channel, name, data string) Position {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, err := h.Publish(ctx, channel, Event{Name: name, Data: []byte(data)})
	require.NoError(t, err, "publish %q to %q", data, channel)
	return p
}

// publishSeq publishes "<tag>-<i>" for i in [from, to] and returns the data.
func publishSeq(t *testing.T, h *Hub, channel, tag string, from, to int) []string {
	t.Helper()
	var out []string
	for i := from; i <= to; i++ {
		d := fmt.Sprintf("%s-%d", tag, i)
		publish(t, h, channel, "", d)
		out = append(out, d)
	}
	return out
}

// seq returns "<tag>-<i>" for i in [from, to].
func seq(tag string, from, to int) []string {
	var out []string
	for i := from; i <= to; i++ {
		out = append(out, fmt.Sprintf("%s-%d", tag, i))
	}
	return out
}

// streamData returns the data of every entry of channel's Redis stream, in
// order: the ground truth a connected client must have received. The stream
// key is found by SCAN under the test's prefix (the only stream there whose
// key ends with the channel name), not by rebuilding the layout.
func streamData(t *testing.T, r *testRedis, channel string) []string {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: r.addrs, DisableCache: true})
	require.NoError(t, err)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var keys []string
	require.NoError(t, scanMasters(ctx, c, matchPattern(r.Keys.Prefix()), func(ctx context.Context, node rueidis.Client, batch []string) error {
		for _, k := range batch {
			if !strings.HasSuffix(k, ":"+channel) {
				continue
			}
			typ, err := node.Do(ctx, node.B().Type().Key(k).Build()).ToString()
			if err != nil {
				return err
			}
			if typ == "stream" {
				keys = append(keys, k)
			}
		}
		return nil
	}))
	require.Len(t, keys, 1, "the stream of %q", channel)
	entries, err := c.Do(ctx, c.B().Xrange().Key(keys[0]).Start("-").End("+").Build()).AsXRange()
	require.NoError(t, err)
	out := make([]string, 0, len(entries))
	for _, e := range entries {
		out = append(out, e.FieldValues["d"])
	}
	return out
}

// requireStreamed requires that s, having consumed the channel's first
// skip events, delivers exactly the rest of the channel's stream: every
// event Redis stored, once, in order. A publish that timed out may still
// land after the test's last one, so it reads the stream again until it
// stops growing.
func requireStreamed(t *testing.T, s *sseStream, r *testRedis, channel string, skip int, msg string) {
	t.Helper()
	var got []string
	truth := streamData(t, r, channel)
	for {
		got = append(got, s.Data(t, len(truth)-skip-len(got))...)
		require.Equal(t, truth[skip:], got, msg)
		again := streamData(t, r, channel)
		if len(again) == len(truth) {
			return
		}
		truth = again
	}
}

// prefixKeys returns every key under the test's prefix.
func prefixKeys(t *testing.T, r *testRedis) []string {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: r.addrs, DisableCache: true})
	require.NoError(t, err)
	defer c.Close()
	var keys []string
	require.NoError(t, scanMasters(ctx5s(t), c, matchPattern(r.Keys.Prefix()), func(_ context.Context, _ rueidis.Client, batch []string) error {
		keys = append(keys, batch...)
		return nil
	}))
	return keys
}

// errorJSON requires a JSON error answer with the given status and returns
// its fields.
func errorJSON(t *testing.T, url string, hdr http.Header, status int) map[string]any {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	require.NoError(t, err)
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, status, resp.StatusCode, "GET %s: %s", url, body)
	require.Contains(t, resp.Header.Get("Content-Type"), "application/json", string(body))
	var out map[string]any
	require.NoError(t, json.Unmarshal(body, &out), string(body))
	require.IsType(t, "", out["error"], string(body))
	require.NotEmpty(t, out["error"], string(body))
	return out
}

// eventually waits for cond within rtWait.
func eventually(t *testing.T, cond func() bool, msg string, args ...any) {
	t.Helper()
	require.Eventually(t, cond, rtWait, 10*time.Millisecond, append([]any{msg}, args...)...)
}

// ---------------------------------------------------------------------------
// Fan-out, targeting, refusals

func TestRealtimeFanOutAcrossInstances(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hubA := newTestHub(t, r, r.Client(), nil)
		hubB := newTestHub(t, r, r.Client(), nil)
		appA, appB := newRTApp(t, hubA, nil, nil), newRTApp(t, hubB, nil, nil)
		const room = "room-fanout"

		onA := openSSE(t, appA.events([]string{room}), nil)
		onB := openSSE(t, appB.events([]string{room}), nil)
		onB2 := openSSE(t, appB.events([]string{room}), nil)

		// Publishes from either instance reach every client, in order, each
		// with its position.
		var epoch string
		for i := 1; i <= 10; i++ {
			from := hubA
			if i%2 == 0 {
				from = hubB
			}
			p := publish(t, from, room, "chat:message", fmt.Sprintf(`{"n":%d}`, i))
			require.Equal(t, uint64(i), p.Offset, "the counter of a new channel starts at 1")
			require.Len(t, p.Epoch, 6)
			if epoch == "" {
				epoch = p.Epoch
			}
			require.Equal(t, epoch, p.Epoch, "the epoch stays while the history lives")
			require.Equal(t, fmt.Sprintf("%s-%d", epoch, i), p.String())
		}
		for _, s := range []*sseStream{onA, onB, onB2} {
			ids := map[string]bool{}
			for i := 1; i <= 10; i++ {
				ev := s.Next(t)
				require.Equal(t, "chat:message", ev.Name)
				require.Equal(t, fmt.Sprintf(`{"n":%d}`, i), ev.Data)
				require.NotEmpty(t, ev.ID, "every event carries its stream id")
				require.False(t, ids[ev.ID], "ids are unique")
				ids[ev.ID] = true
			}
		}

		// The default event name, and data of several lines.
		publish(t, hubB, room, "", "line one\nline two\n\nline four")
		for _, s := range []*sseStream{onA, onB, onB2} {
			ev := s.Next(t)
			require.Equal(t, "message", ev.Name)
			require.Equal(t, "line one\nline two\n\nline four", ev.Data)
		}
		require.EqualValues(t, 1, hubA.Stats().Connections)
		require.EqualValues(t, 2, hubB.Stats().Connections)
		require.GreaterOrEqual(t, hubB.Stats().Delivered, uint64(22))
		require.EqualValues(t, 5, hubA.Stats().Published)
	})
}

func TestRealtimePerUserTargeting(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		// The app streams the asked rooms plus the user's own channel.
		withUser := func(cfg *SSEConfig) {
			cfg.Channels = func(c echo.Context) ([]string, error) {
				chs := strings.Split(c.QueryParam("channels"), ",")
				if u := c.Request().Header.Get("X-User"); u != "" {
					chs = append(chs, "user:"+u)
				}
				return chs, nil
			}
		}
		hubA := newTestHub(t, r, r.Client(), nil)
		hubB := newTestHub(t, r, r.Client(), nil)
		appA, appB := newRTApp(t, hubA, withUser, nil), newRTApp(t, hubB, withUser, nil)
		const room = "lobby"

		alice := openSSE(t, appA.events([]string{room}), header("X-User", "alice"))
		bob := openSSE(t, appB.events([]string{room}), header("X-User", "bob"))
		anon := openSSE(t, appB.events([]string{room}), nil)

		publish(t, hubA, "user:bob", "notification", "for bob")
		publish(t, hubB, "user:alice", "notification", "for alice")
		publish(t, hubA, room, "", "for all")

		// Different channels may arrive in any order; each stream gets its
		// own private event and the room's.
		got := func(s *sseStream, n int) []string {
			d := s.Data(t, n)
			sort.Strings(d)
			return d
		}
		require.Equal(t, []string{"for alice", "for all"}, got(alice, 2))
		require.Equal(t, []string{"for all", "for bob"}, got(bob, 2))
		require.Equal(t, []string{"for all"}, got(anon, 1))

		// Nothing else was delivered: the next event everyone sees is the
		// room's next one.
		publish(t, hubB, room, "", "end")
		for _, s := range []*sseStream{alice, bob, anon} {
			require.Equal(t, "end", s.Next(t).Data)
			s.Quiet(t)
		}
	})
}

func TestRealtimeRefusesBeforeStreaming(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		authorized := func(cfg *SSEConfig) {
			cfg.Authorize = func(c echo.Context, channel string) error {
				switch {
				case channel == "admin" && c.Request().Header.Get("X-User") != "alice":
					return errors.New("only alice")
				case channel == "teapot":
					return echo.NewHTTPError(http.StatusTeapot, "short and stout")
				}
				return nil
			}
		}
		app := newRTApp(t, hub, authorized, nil)
		many := func(n int) string {
			var chs []string
			for i := range n {
				chs = append(chs, fmt.Sprintf("c%d", i))
			}
			return strings.Join(chs, ",")
		}
		for _, tc := range []struct {
			name     string
			channels string
			user     string
			status   int
			channel  string // of a 403
		}{
			{name: "refused channel", channels: "room,admin", user: "bob", status: http.StatusForbidden, channel: "admin"},
			{name: "refused when anonymous", channels: "admin", status: http.StatusForbidden, channel: "admin"},
			{name: "allowed channel", channels: "room,admin", user: "alice", status: http.StatusOK},
			{name: "an echo.HTTPError keeps its code", channels: "teapot", status: http.StatusTeapot},
			{name: "no channels", channels: "", status: http.StatusBadRequest},
			{name: "empty name", channels: "a,,b", status: http.StatusBadRequest},
			{name: "duplicated name", channels: "a,b,a", status: http.StatusBadRequest},
			{name: "control character", channels: "a\x01b", status: http.StatusBadRequest},
			{name: "newline", channels: "a\nb", status: http.StatusBadRequest},
			{name: "DEL character", channels: "a\x7fb", status: http.StatusBadRequest},
			{name: "257 bytes", channels: strings.Repeat("x", 257), status: http.StatusBadRequest},
			{name: "256 bytes", channels: strings.Repeat("x", 256), status: http.StatusOK},
			{name: "17 channels", channels: many(17), status: http.StatusBadRequest},
			{name: "16 channels", channels: many(16), status: http.StatusOK},
			{name: "colons and braces are fine", channels: "chat:{x}:1", status: http.StatusOK},
		} {
			t.Run(tc.name, func(t *testing.T) {
				u := app.URL + "/events?" + url.Values{"channels": {tc.channels}}.Encode()
				hdr := header("X-User", tc.user)
				if tc.status == http.StatusOK {
					openSSE(t, u, hdr).Close()
					return
				}
				if tc.status == http.StatusTeapot {
					// Echo's error handler renders the app's own HTTPError.
					resp, err := http.Get(u)
					require.NoError(t, err)
					_ = resp.Body.Close()
					require.Equal(t, tc.status, resp.StatusCode)
					require.NotEqual(t, "text/event-stream", resp.Header.Get("Content-Type"))
					return
				}
				body := errorJSON(t, u, hdr, tc.status)
				if tc.channel != "" {
					require.Equal(t, map[string]any{"error": "forbidden", "channel": tc.channel}, body)
				}
			})
		}
		eventually(t, func() bool { return hub.Stats().Connections == 0 }, "refused streams hold nothing")

		// MaxChannels raises the limit.
		wide := newRTApp(t, hub, func(cfg *SSEConfig) { cfg.MaxChannels = 20 }, nil)
		openSSE(t, wide.URL+"/events?channels="+many(20), nil).Close()
		errorJSON(t, wide.URL+"/events?channels="+many(21), nil, http.StatusBadRequest)
	})
}

func TestRealtimePublishRefusesBadEvents(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) { cfg.MaxEventSize = 1024 })
		const ch = "refused"
		for _, tc := range []struct {
			name    string
			channel string
			ev      Event
			want    error
		}{
			{"Name and Data over MaxEventSize", ch, Event{Name: "big", Data: make([]byte, 1022)}, ErrEventTooLarge},
			{"Data over MaxEventSize", ch, Event{Data: []byte(strings.Repeat("x", 1025))}, ErrEventTooLarge},
			{"name of 65 bytes", ch, Event{Name: strings.Repeat("n", 65), Data: []byte("{}")}, ErrInvalidEvent},
			{"name with a newline", ch, Event{Name: "a\nb", Data: []byte("{}")}, ErrInvalidEvent},
			{"name with a carriage return", ch, Event{Name: "a\rb", Data: []byte("{}")}, ErrInvalidEvent},
			{"empty channel", "", Event{Data: []byte("{}")}, ErrInvalidChannel},
			{"channel with a control character", "a\x00b", Event{Data: []byte("{}")}, ErrInvalidChannel},
			{"channel of 257 bytes", strings.Repeat("c", 257), Event{Data: []byte("{}")}, ErrInvalidChannel},
		} {
			t.Run(tc.name, func(t *testing.T) {
				_, err := hub.Publish(ctx5s(t), tc.channel, tc.ev)
				require.ErrorIs(t, err, tc.want)
			})
		}
		require.Empty(t, prefixKeys(t, r), "a refused event writes nothing")
		require.Zero(t, hub.Stats().Published)

		// The limits themselves are fine.
		_, err := hub.Publish(ctx5s(t), ch, Event{Name: "big", Data: make([]byte, 1021)})
		require.NoError(t, err)
		_, err = hub.Publish(ctx5s(t), ch, Event{Name: strings.Repeat("n", 64), Data: []byte("{}")})
		require.NoError(t, err)
		require.EqualValues(t, 2, hub.Stats().Published)
	})
}

// ---------------------------------------------------------------------------
// Disconnect

// requireDisconnected requires that the server ended s after a last
// "disconnect" event with the given reason.
func requireDisconnected(t *testing.T, s *sseStream, reason string) sseEvent {
	t.Helper()
	evs := s.End(t)
	require.NotEmpty(t, evs, "a last event says why the stream ended")
	last := evs[len(evs)-1]
	require.Equal(t, "disconnect", last.Name, "%+v", evs)
	require.NotEmpty(t, last.ID, "the disconnect event carries a position")
	require.JSONEq(t, fmt.Sprintf(`{"reason":%q}`, reason), last.Data)
	return last
}

func TestRealtimeDisconnectAcrossInstances(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hubA := newTestHub(t, r, r.Client(), nil)
		hubB := newTestHub(t, r, r.Client(), nil)
		appA, appB := newRTApp(t, hubA, nil, nil), newRTApp(t, hubB, nil, nil)
		const room = "private"

		bobA := openSSE(t, appA.events([]string{room}), header("X-User", "bob"))
		bobB := openSSE(t, appB.events([]string{room, "other"}), header("X-User", "bob"))
		carol := openSSE(t, appB.events([]string{room}), header("X-User", "carol"))

		require.NoError(t, hubA.Disconnect(ctx5s(t), "bob"))
		requireDisconnected(t, bobA, "disconnected")
		requireDisconnected(t, bobB, "disconnected")
		eventually(t, func() bool { return hubA.Stats().Connections == 0 && hubB.Stats().Connections == 1 }, "bob's streams are gone on both instances")
		eventually(t, func() bool { return appA.Active.Load() == 0 && appB.Active.Load() == 1 }, "their handlers returned")

		// Carol is untouched, and bob may reconnect (Disconnect is not a ban).
		publish(t, hubA, room, "", "after")
		require.Equal(t, "after", carol.Next(t).Data)
		bob := openSSE(t, appA.events([]string{room}), header("X-User", "bob"))
		publish(t, hubB, room, "", "again")
		require.Equal(t, "again", bob.Next(t).Data)

		// Disconnecting a user without streams, or anonymous streams, is a no-op.
		require.NoError(t, hubB.Disconnect(ctx5s(t), "nobody"))
		require.Error(t, hubB.Disconnect(ctx5s(t), ""), "the empty user ID is nobody's")
		publish(t, hubB, room, "", "still")
		require.Equal(t, []string{"again", "still"}, carol.Data(t, 2))
	})
}

// ---------------------------------------------------------------------------
// Streams bound to a session

func TestRealtimeSessionBoundStreams(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		client := r.Client()
		store, err := NewSessionStore(SessionConfig{Client: client, Keys: []string{testKey}, IdleTimeout: time.Second,
			Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()}})
		require.NoError(t, err)
		hub := newTestHub(t, r, client, nil)
		e := echo.New()
		e.Use(store.Middleware())
		e.POST("/login", func(c echo.Context) error {
			s, err := GetSession(c)
			if err != nil {
				return err
			}
			if err := s.SetUserID(c.QueryParam("user")); err != nil {
				return err
			}
			return c.NoContent(http.StatusNoContent)
		})
		e.POST("/logout", func(c echo.Context) error {
			s, err := GetSession(c)
			if err != nil {
				return err
			}
			if err := s.Destroy(); err != nil {
				return err
			}
			return c.NoContent(http.StatusNoContent)
		})
		e.GET("/events", SSEWithConfig(SSEConfig{Hub: hub, AliveInterval: 50 * time.Millisecond}))
		srv := httptest.NewServer(e)
		t.Cleanup(func() { srv.CloseClientConnections(); srv.Close() })
		login := func(user string) *browser {
			b := newBrowser(t)
			require.Equal(t, http.StatusNoContent, b.do(http.MethodPost, srv.URL+"/login?user="+user).code)
			return b
		}
		stream := func(b *browser) *sseStream {
			return openSSEWith(t, b.hc, srv.URL+"/events?channels=room", nil)
		}

		// Logging out ends the session's streams at the next check.
		alice := login("alice")
		s := stream(alice)
		require.Equal(t, http.StatusNoContent, alice.do(http.MethodPost, srv.URL+"/logout").code)
		requireDisconnected(t, s, "session")

		// The user of a stream is the session's: Disconnect reaches it.
		carol := login("carol")
		s = stream(carol)
		require.NoError(t, hub.Disconnect(ctx5s(t), "carol"))
		requireDisconnected(t, s, "disconnected")

		// An open stream does not keep its session alive: with no other
		// request, the session expires after IdleTimeout, and so does the
		// stream.
		bob := login("bob")
		s = stream(bob)
		requireDisconnected(t, s, "session")
		require.Equal(t, http.StatusNoContent, bob.do(http.MethodPost, srv.URL+"/logout").code)

		// An anonymous stream has no session check.
		anon := openSSE(t, srv.URL+"/events?channels=room", nil)
		time.Sleep(200 * time.Millisecond)
		publish(t, hub, "room", "", "still here")
		require.Equal(t, "still here", anon.Next(t).Data)
	})
}

func TestRealtimeAliveCheck(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		var verdict atomic.Value // "alive", "error" or "gone"
		verdict.Store("error")
		var checks atomic.Int64
		app := newRTApp(t, hub, func(cfg *SSEConfig) {
			cfg.AliveInterval = 20 * time.Millisecond
			cfg.Alive = func(echo.Context) func(context.Context) (bool, error) {
				return func(context.Context) (bool, error) {
					checks.Add(1)
					switch verdict.Load() {
					case "error":
						return false, errors.New("redis is busy")
					case "gone":
						return false, nil
					}
					return true, nil
				}
			}
		}, nil)
		s := openSSE(t, app.events([]string{"room"}), nil)
		// A failing check keeps the stream: Redis trouble is not a logout.
		eventually(t, func() bool { return checks.Load() >= 5 }, "the check runs")
		publish(t, hub, "room", "", "kept")
		require.Equal(t, "kept", s.Next(t).Data)
		verdict.Store("alive")
		n := checks.Load()
		eventually(t, func() bool { return checks.Load() >= n+3 }, "the check keeps running")
		verdict.Store("gone")
		requireDisconnected(t, s, "session")
		eventually(t, func() bool { return hub.Stats().Connections == 0 }, "the stream is gone")
	})
}

// ---------------------------------------------------------------------------
// Resume

func TestRealtimeResumeIsExact(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hubA := newTestHub(t, r, r.Client(), nil)
		hubB := newTestHub(t, r, r.Client(), nil)
		app := newRTApp(t, hubA, nil, nil)
		const ch = "resume"

		s := openSSE(t, app.events([]string{ch}), nil)
		first := app.start(t)
		require.False(t, first.Resumed)
		require.NotEmpty(t, first.ConnID)
		publishSeq(t, hubB, ch, "e", 1, 3)
		require.Equal(t, seq("e", 1, 3), s.Data(t, 3))
		at3 := s.LastID()
		s.Close()

		// Missed while away: exactly those, in order, then live ones.
		epoch := publish(t, hubB, ch, "", "e-4").Epoch
		publishSeq(t, hubB, ch, "e", 5, 8)
		resumes := hubA.Stats().Resumes
		s = openSSE(t, app.events([]string{ch}), header("Last-Event-ID", at3))
		st := app.start(t)
		require.True(t, st.Resumed)
		require.Len(t, st.Channels, 1)
		require.Equal(t, ch, st.Channels[0].Channel)
		require.True(t, st.Channels[0].Resumed)
		require.False(t, st.Channels[0].Reset)
		require.Equal(t, epoch, st.Channels[0].Position.Epoch)
		require.Equal(t, resumes+1, hubA.Stats().Resumes)
		publishSeq(t, hubB, ch, "e", 9, 10)
		require.Equal(t, seq("e", 4, 10), s.Data(t, 7))
		s.Quiet(t)
		ids := map[string]string{}
		s.Close()

		// The query parameter, for a page that opens a new EventSource.
		s = openSSE(t, app.events([]string{ch}), header("Last-Event-ID", at3))
		for range 7 {
			ev := s.Next(t)
			ids[ev.Data] = ev.ID
		}
		s.Close()
		s = openSSE(t, app.events([]string{ch}, "lastEventId", ids["e-5"]), nil)
		publishSeq(t, hubB, ch, "e", 11, 11)
		require.Equal(t, seq("e", 6, 11), s.Data(t, 6))
		s.Close()

		// The header wins over the query parameter.
		s = openSSE(t, app.events([]string{ch}, "lastEventId", at3), header("Last-Event-ID", ids["e-9"]))
		publishSeq(t, hubB, ch, "e", 12, 12)
		require.Equal(t, seq("e", 10, 12), s.Data(t, 3))

		// Reconnects while an instance publishes without pause, each to the
		// next of three instances (one of them the publisher, one that
		// subscribes only when the client comes): no gap and no duplicate
		// at any switch from replay to live, nor when the new instance is
		// behind or ahead of the old one.
		hubC := newTestHub(t, r, r.Client(), nil)
		apps := []*rtApp{app, newRTApp(t, hubB, nil, nil), newRTApp(t, hubC, nil, nil)}
		const last = 200
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := 13; i <= last; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := hubB.Publish(ctx, ch, Event{Data: []byte(fmt.Sprintf("e-%d", i))})
				cancel()
				if err != nil {
					t.Errorf("publish e-%d: %v", i, err)
					return
				}
				time.Sleep(time.Millisecond)
			}
		}()
		var got []string
		final := fmt.Sprintf("e-%d", last)
		for round := 0; len(got) == 0 || got[len(got)-1] != final; round++ {
			for range 9 + round%7 {
				if got = append(got, s.Next(t).Data); got[len(got)-1] == final {
					break
				}
			}
			id := s.LastID()
			s.Close()
			s = openSSE(t, apps[round%len(apps)].events([]string{ch}), header("Last-Event-ID", id))
			if round%2 == 1 {
				time.Sleep(5 * time.Millisecond) // let a few pile up
			}
		}
		<-done
		require.Equal(t, seq("e", 13, last), got)
	})
}

func TestRealtimeResumeSeveralChannels(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		pub := newTestHub(t, r, r.Client(), nil)
		app := newRTApp(t, hub, nil, nil)

		s := openSSE(t, app.events([]string{"a", "b"}), nil)
		app.start(t)
		publish(t, pub, "a", "", "a-1")
		publish(t, pub, "b", "", "b-1")
		got := s.Data(t, 2)
		sort.Strings(got)
		require.Equal(t, []string{"a-1", "b-1"}, got)
		id := s.LastID()
		require.Equal(t, 2, strings.Count(id, "."), "one position per channel in %q", id)
		require.LessOrEqual(t, len(id), 2048)
		s.Close()

		publish(t, pub, "a", "", "a-2")
		publish(t, pub, "b", "", "b-2")
		publish(t, pub, "a", "", "a-3")
		publish(t, pub, "c", "", "c-1") // c is new to the connection: not replayed

		s = openSSE(t, app.events([]string{"a", "b", "c"}), header("Last-Event-ID", id))
		st := app.start(t)
		require.True(t, st.Resumed)
		byName := map[string]ChannelStart{}
		for _, c := range st.Channels {
			byName[c.Channel] = c
		}
		require.True(t, byName["a"].Resumed)
		require.True(t, byName["b"].Resumed)
		require.False(t, byName["c"].Resumed, "a channel new to the connection starts live")
		require.False(t, byName["c"].Reset)

		got = s.Data(t, 3)
		require.Equal(t, []string{"a-2", "a-3"}, filterPrefix(got, "a-"), "each channel in order")
		require.Equal(t, []string{"b-2"}, filterPrefix(got, "b-"))
		publish(t, pub, "c", "", "c-2")
		require.Equal(t, "c-2", s.Next(t).Data)
		id = s.LastID()
		require.Equal(t, 3, strings.Count(id, "."), "the new channel joined the id %q", id)
		s.Close()

		// A channel no longer asked for is dropped from the id, and a
		// resume of the others still works from that id.
		publish(t, pub, "b", "", "b-3")
		s = openSSE(t, app.events([]string{"b"}), header("Last-Event-ID", id))
		require.Equal(t, "b-3", s.Next(t).Data)
		require.Equal(t, 1, strings.Count(s.LastID(), "."), "only b is left in %q", s.LastID())
	})
}

func filterPrefix(in []string, prefix string) []string {
	var out []string
	for _, s := range in {
		if strings.HasPrefix(s, prefix) {
			out = append(out, s)
		}
	}
	return out
}

// runPublisher publishes "<tag>-<i>" to channel every interval until stop is
// closed, ignoring errors (a publish that failed may still have reached the
// stream: the stream, not the publisher, is the ground truth). It returns
// when the goroutine ended.
func runPublisher(h *Hub, channel, tag string, interval time.Duration, stop <-chan struct{}) (wait func() int) {
	var n atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(interval):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, _ = h.Publish(ctx, channel, Event{Data: []byte(fmt.Sprintf("%s-%d", tag, i))})
			cancel()
			n.Store(int64(i))
		}
	}()
	return func() int { <-done; return int(n.Load()) }
}

// publishEventually publishes data, retrying while Redis recovers.
func publishEventually(t *testing.T, h *Hub, channel, data string) {
	t.Helper()
	eventually(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := h.Publish(ctx, channel, Event{Data: []byte(data)})
		return err == nil
	}, "publish %q once Redis is back", data)
}

func TestRealtimeConnectedClientsLoseNothingAcrossBlips(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		fast := func(cfg *HubConfig) {
			cfg.Timeout = 300 * time.Millisecond
			cfg.Breaker = NewBreaker(BreakerConfig{Cooldown: 200 * time.Millisecond, Logger: discardLogger()})
		}
		hub := newTestHub(t, f.testRedis, f.Client(), fast)
		pub := newTestHub(t, f.testRedis, f.Client(), fast)
		app := newRTApp(t, hub, func(cfg *SSEConfig) { cfg.Heartbeat = 100 * time.Millisecond }, nil)
		const ch = "blips"

		stay := openSSE(t, app.events([]string{ch}), nil) // connected all along
		away := openSSE(t, app.events([]string{ch}), nil) // leaves during the blip and resumes
		stop := make(chan struct{})
		wait := runPublisher(pub, ch, "p", 5*time.Millisecond, stop)
		away.Data(t, 3)
		stay.Data(t, 3)

		f.KillConnections(t) // every connection, the subscriptions included
		time.Sleep(300 * time.Millisecond)
		awayID := away.LastID()
		away.Close()
		f.Pause(t)
		time.Sleep(time.Second)
		f.Resume(t)
		time.Sleep(300 * time.Millisecond)
		close(stop)
		wait()
		publishEventually(t, pub, ch, "final")

		away = openSSE(t, app.events([]string{ch}), header("Last-Event-ID", awayID))
		require.Greater(t, len(streamData(t, f.testRedis, ch)), 20)
		requireStreamed(t, stay, f.testRedis, ch, 3, "the connected client got every event of the stream, once, in order")
		// The one that left (after the same three) gets exactly the rest.
		requireStreamed(t, away, f.testRedis, ch, 3, "the resumed client continues right after its position")
		require.GreaterOrEqual(t, hub.Stats().Rereads, uint64(1), "the hub re-read the stream after resubscribing")
	})
}

// ---------------------------------------------------------------------------
// Reset

// requireReset reads the next event of s and requires it to be the reset
// event naming channels, with an id.
func requireReset(t *testing.T, s *sseStream, channels ...string) sseEvent {
	t.Helper()
	ev := s.Next(t)
	require.Equal(t, "reset", ev.Name, "%+v", ev)
	require.NotEmpty(t, ev.ID, "a reset carries the new position")
	var body struct {
		Channels []string `json:"channels"`
	}
	require.NoError(t, json.Unmarshal([]byte(ev.Data), &body), ev.Data)
	require.ElementsMatch(t, channels, body.Channels)
	return ev
}

// requireResetThenResume checks the reset protocol from an id that no
// longer reaches back: a reset event, then live events only; and a
// reconnect from the reset's id resumes without another reset.
func requireResetThenResume(t *testing.T, app *rtApp, pub *Hub, ch, staleID string) {
	t.Helper()
	resets := app.Hub.Stats().Resets
	// (StreamStart.Reset may still be false here: the hub plans from what
	// it knows, and learns of the new epoch from the next announcement;
	// the reset event is the contract.)
	s, st := app.open(t, app.events([]string{ch}), header("Last-Event-ID", staleID))
	require.Len(t, st.Channels, 1)
	require.True(t, st.Channels[0].Resumed, "the position was valid")
	reset := requireReset(t, s, ch)
	require.Greater(t, app.Hub.Stats().Resets, resets)
	publish(t, pub, ch, "", "live-1")
	require.Equal(t, "live-1", s.Next(t).Data, "after a reset come live events, no replay of what is left")
	s.Close()

	// The reset's id is a real position: from it, no second reset, and
	// what was published since is replayed.
	s, st = app.open(t, app.events([]string{ch}), header("Last-Event-ID", reset.ID))
	require.False(t, st.Channels[0].Reset)
	require.True(t, st.Channels[0].Resumed)
	publish(t, pub, ch, "", "live-2")
	require.Equal(t, []string{"live-1", "live-2"}, s.Data(t, 2))
	s.Close()
}

func TestRealtimeResetAfterTrimmedHistory(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		small := func(cfg *HubConfig) { cfg.MaxLen = 10 }
		hub := newTestHub(t, r, r.Client(), small)
		pub := newTestHub(t, r, r.Client(), small)
		app := newRTApp(t, hub, nil, nil)
		const ch = "trimmed"

		s := openSSE(t, app.events([]string{ch}), nil)
		publish(t, pub, ch, "", "old")
		require.Equal(t, "old", s.Next(t).Data)
		stale := s.LastID()
		s.Close()
		publishSeq(t, pub, ch, "x", 1, 300) // approximate trimming drops whole nodes of 100
		history := streamData(t, r, ch)
		require.GreaterOrEqual(t, len(history), 10, "at least MaxLen events are kept")
		require.NotEqual(t, "old", history[0])
		require.NotEqual(t, "x-1", history[0], "the test needs the history trimmed past its position")
		requireResetThenResume(t, app, pub, ch, stale)

		// The reset event's name and the position parameter are the
		// app's to choose.
		custom := newRTApp(t, hub, func(cfg *SSEConfig) {
			cfg.ResetEvent = "history-lost"
			cfg.PositionParam = "pos"
		}, nil)
		s = openSSE(t, custom.events([]string{ch}, "pos", stale), nil)
		ev := s.Next(t)
		require.Equal(t, "history-lost", ev.Name)
		require.JSONEq(t, fmt.Sprintf(`{"channels":[%q]}`, ch), ev.Data)
	})
}

// TestRealtimeResumeWithManyChannels: with MaxChannels raised, a stream's
// id must still carry every channel back, or the config must be refused;
// a stream that silently restarts live would lose events.
func TestRealtimeResumeWithManyChannels(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		for _, n := range []int{64, 100, 200} {
			t.Run(strconv.Itoa(n), func(t *testing.T) {
				if _, err := (SSEConfig{Hub: hub, MaxChannels: n}).ToHandler(); err != nil {
					return // a limit the ids cannot carry is refused
				}
				app := newRTApp(t, hub, func(cfg *SSEConfig) { cfg.MaxChannels = n }, nil)
				var names []string
				for i := range n {
					names = append(names, fmt.Sprintf("many-%d-%d", n, i))
				}
				s := openSSE(t, app.events(names), nil)
				publish(t, hub, names[0], "", "first")
				require.Equal(t, "first", s.Next(t).Data)
				id := s.LastID()
				s.Close()
				publish(t, hub, names[n-1], "", "missed")
				s = openSSE(t, app.events(names), header("Last-Event-ID", id))
				publish(t, hub, names[0], "", "live")
				require.Equal(t, "missed", s.Next(t).Data, "a stream of %d channels resumes (its id is %d bytes)", n, len(id))
				require.Equal(t, "live", s.Next(t).Data)
			})
		}
	})
}

func TestRealtimeResetNamesOnlyTheChannelsThatLostEvents(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		small := func(cfg *HubConfig) { cfg.MaxLen = 10 }
		hub := newTestHub(t, r, r.Client(), small)
		pub := newTestHub(t, r, r.Client(), small)
		app := newRTApp(t, hub, nil, nil)
		chs := []string{"keep", "trim"}

		s := openSSE(t, app.events(chs), nil)
		publish(t, pub, "keep", "", "k-0")
		publish(t, pub, "trim", "", "t-0")
		require.ElementsMatch(t, []string{"k-0", "t-0"}, s.Data(t, 2))
		id := s.LastID()
		s.Close()
		publishSeq(t, pub, "trim", "t", 1, 300)
		publishSeq(t, pub, "keep", "k", 1, 2)

		s, st := app.open(t, app.events(chs), header("Last-Event-ID", id))
		var resets, replayed []string
		for range 3 {
			ev := s.Next(t)
			if ev.Name == "reset" {
				resets = append(resets, ev.Data)
				continue
			}
			replayed = append(replayed, ev.Data)
		}
		require.Equal(t, []string{`{"channels":["trim"]}`}, resets, "only the trimmed channel lost events")
		require.Equal(t, []string{"k-1", "k-2"}, replayed, "the other channel resumes")
		for _, c := range st.Channels {
			require.True(t, c.Resumed, c.Channel)
		}
		id = s.LastID()
		s.Close()

		// From the id after the reset, both channels resume quietly.
		s = openSSE(t, app.events(chs), header("Last-Event-ID", id))
		publish(t, pub, "trim", "", "t-live")
		require.Equal(t, "t-live", s.Next(t).Data)
		s.Quiet(t)
	})
}

func TestRealtimeResetAfterDeletedHistory(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		pub := newTestHub(t, r, r.Client(), nil)
		app := newRTApp(t, hub, nil, nil)
		const ch = "deleted"

		s := openSSE(t, app.events([]string{ch}), nil)
		old := publish(t, pub, ch, "", "old")
		require.Equal(t, "old", s.Next(t).Data)
		stale := s.LastID()
		s.Close()
		eventually(t, func() bool { return hub.Stats().Connections == 0 }, "the stream ended")

		r.deleteKeys() // DEL of the stream, its meta hash and presence
		fresh := publish(t, pub, ch, "", "lost")
		require.NotEqual(t, old.Epoch, fresh.Epoch, "lost history starts a new epoch")
		require.Equal(t, uint64(1), fresh.Offset)
		requireResetThenResume(t, app, pub, ch, stale)
	})
}

func TestRealtimeResetAfterExpiredHistory(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		// The stream expires quickly; the epoch and counter outlive it.
		brief := func(cfg *HubConfig) { cfg.HistoryTTL = 300 * time.Millisecond }
		hub := newTestHub(t, r, r.Client(), brief)
		pub := newTestHub(t, r, r.Client(), brief)
		app := newRTApp(t, hub, nil, nil)
		const ch = "expiring"

		s := openSSE(t, app.events([]string{ch}), nil)
		before := publish(t, pub, ch, "", "old")
		require.Equal(t, "old", s.Next(t).Data)
		stale := s.LastID()
		s.Close()
		publish(t, pub, ch, "", "expires unseen")
		eventually(t, func() bool {
			for _, k := range prefixKeys(t, r) {
				if strings.HasSuffix(k, ":s:"+ch) {
					return false
				}
			}
			return true
		}, "the stream expired")
		requireResetThenResume(t, app, pub, ch, stale)

		// The counter went on: positions stay unique within the epoch.
		p := publish(t, pub, ch, "", "later")
		require.Equal(t, before.Epoch, p.Epoch)
		require.Greater(t, p.Offset, before.Offset+1)
	})
}

func TestRealtimeResetAfterRestartWithoutPersistence(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		fast := func(cfg *HubConfig) {
			cfg.Timeout = 300 * time.Millisecond
			cfg.Breaker = NewBreaker(BreakerConfig{Cooldown: 200 * time.Millisecond, Logger: discardLogger()})
		}
		hub := newTestHub(t, f.testRedis, f.Client(), fast)
		app := newRTApp(t, hub, nil, nil)
		const ch = "restarted"

		away := openSSE(t, app.events([]string{ch}), nil)
		stay := openSSE(t, app.events([]string{ch}), nil)
		publishSeq(t, hub, ch, "before", 1, 3)
		require.Equal(t, seq("before", 1, 3), away.Data(t, 3))
		require.Equal(t, seq("before", 1, 3), stay.Data(t, 3))
		stale := away.LastID()
		away.Close()

		f.Stop(t)
		f.Start(t)
		// Another instance publishes; its client connected after the
		// restart (a publish on a connection that died with the server
		// fails once, as any rueidis write).
		pub := newTestHub(t, f.testRedis, f.Client(), fast)
		publishEventually(t, pub, ch, "after")

		// The connected client is told that history was lost before it gets
		// any event of the new epoch: never a silent gap. The reset may
		// cover what the new epoch holds already ("after", published before
		// the hub resubscribed); from there on, it gets every event.
		requireReset(t, stay, ch)
		publish(t, pub, ch, "", "after-2")
		got := stay.Until(t, "after-2")
		require.Contains(t, [][]string{{"after", "after-2"}, {"after-2"}}, got)

		// A client that comes back with a position of the lost epoch too.
		requireResetThenResume(t, app, pub, ch, stale)
	})
}

// ---------------------------------------------------------------------------
// Replay pacing and slow clients

func TestRealtimeFullMaxLenResume(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		const maxLen = 300
		hub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) {
			cfg.MaxLen = maxLen
			cfg.ClientQueueEvents = 8 // far below what the replay sends
			cfg.ReplayPage = 25
		})
		pub := newTestHub(t, r, r.Client(), nil)
		app := newRTApp(t, hub, nil, nil)
		const ch = "replay"

		s := openSSE(t, app.events([]string{ch}), nil)
		publish(t, pub, ch, "", "r-0")
		require.Equal(t, "r-0", s.Next(t).Data)
		from := s.LastID()
		s.Close()
		publishSeq(t, pub, ch, "r", 1, maxLen)

		// Live events keep coming while the client replays.
		s, st := app.open(t, app.events([]string{ch}), header("Last-Event-ID", from))
		live := make(chan struct{})
		go func() {
			defer close(live)
			for i := maxLen + 1; i <= maxLen+40; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := pub.Publish(ctx, ch, Event{Data: []byte(fmt.Sprintf("r-%d", i))})
				cancel()
				if err != nil {
					t.Errorf("publish: %v", err)
					return
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
		require.Equal(t, seq("r", 1, maxLen+40), s.Data(t, maxLen+40))
		<-live
		require.True(t, st.Channels[0].Resumed)
		require.False(t, st.Channels[0].Reset)
		require.Zero(t, hub.Stats().DroppedSlow, "replay does not count as falling behind")
		require.Zero(t, hub.Stats().Resets)
	})
}

// dialTinyReceiveBuffer opens a TCP connection to addr whose receive buffer
// is set to the kernel's minimum before the handshake, so that the window it
// advertises stays tiny and a peer writing to it blocks after a few KB
// (loopback otherwise absorbs megabytes).
func dialTinyReceiveBuffer(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1024)
		}); err != nil {
			return err
		}
		return serr
	}}
	conn, err := d.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func TestRealtimeSlowClientIsDroppedAndDelaysNoOne(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) {
			cfg.MaxLen = 20
			cfg.ClientQueueEvents = 32
			cfg.ClientQueueBytes = 512 << 10
		})
		pub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) { cfg.MaxLen = 20 })
		app := newRTApp(t, hub, nil, nil)
		const ch = "slow"

		// The slow client reads the headers and the first bytes, then stops.
		slow := dialTinyReceiveBuffer(t, app.Listener.Addr().String())
		_, err := fmt.Fprintf(slow, "GET /events?channels=%s HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n", ch)
		require.NoError(t, err)
		require.NoError(t, slow.SetReadDeadline(time.Now().Add(rtWait)))
		br := bufio.NewReaderSize(slow, 16)
		for {
			line, err := br.ReadString('\n')
			require.NoError(t, err)
			if strings.HasPrefix(line, ": connected") {
				break
			}
		}
		normal := openSSE(t, app.events([]string{ch}), nil)
		eventually(t, func() bool { return hub.Stats().Connections == 2 }, "both streams are open")

		// Publish large events until the slow client is dropped; the normal
		// client receives each one before the next is published.
		payload := strings.Repeat("x", 60_000)
		var sent int
		for sent = 1; sent <= 600 && hub.Stats().DroppedSlow == 0; sent++ {
			d := fmt.Sprintf("%d %s", sent, payload)
			publish(t, pub, ch, "big", d)
			ev := normal.Next(t)
			require.Equal(t, d, ev.Data, "event %d reached the normal client", sent)
		}
		require.EqualValues(t, 1, hub.Stats().DroppedSlow, "the slow client was dropped after %d events", sent)
		for i := range 5 {
			d := fmt.Sprintf("after %d", i)
			publish(t, pub, ch, "", d)
			require.Equal(t, d, normal.Next(t).Data)
		}
		eventually(t, func() bool { return hub.Stats().Connections == 1 && app.Active.Load() == 1 }, "the slow client's handler ended")

		// The server closed the slow connection: reading it reaches the end.
		require.NoError(t, slow.SetReadDeadline(time.Now().Add(rtWait)))
		_, err = io.Copy(io.Discard, br)
		require.NoError(t, err, "the server closed the slow client's connection")
		require.EqualValues(t, 1, hub.Stats().DroppedSlow)
	})
}

// ---------------------------------------------------------------------------
// HTTP details

func TestRealtimeHTTPDetails(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		const timeout = 300 * time.Millisecond
		app := newRTApp(t, hub, func(cfg *SSEConfig) {
			cfg.Heartbeat = 50 * time.Millisecond
			cfg.Retry = 1500 * time.Millisecond
		}, func(srv *http.Server) {
			srv.WriteTimeout = timeout
			srv.ReadTimeout = timeout
		})
		const ch = "details"

		t.Run("first bytes and headers", func(t *testing.T) {
			resp, err := http.Get(app.events([]string{ch}))
			require.NoError(t, err)
			defer resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
			require.Equal(t, "no-cache", resp.Header.Get("Cache-Control"))
			require.Equal(t, "no", resp.Header.Get("X-Accel-Buffering"))
			require.Empty(t, resp.Header.Get("Content-Length"))
			// The first block: the retry hint, the start position as the
			// id (a channel without history: epoch 000000, offset 0), and
			// the comment that says the stream is live.
			want := "retry: 1500\nid: 1." + channelHash(ch) + noEpoch + "0\n: connected\n\n"
			first := make([]byte, len(want))
			_, err = io.ReadFull(resp.Body, first)
			require.NoError(t, err)
			require.Equal(t, want, string(first))
		})

		t.Run("heartbeats and server timeouts", func(t *testing.T) {
			s := openSSE(t, app.events([]string{ch}), nil)
			require.Equal(t, "1500", s.retry.Load())
			eventually(t, func() bool { return s.heartbeats.Load() >= 3 }, "heartbeats arrive")
			// The stream outlives the server's WriteTimeout and ReadTimeout.
			time.Sleep(3 * timeout)
			publish(t, hub, ch, "", "late")
			require.Equal(t, "late", s.Next(t).Data)
			hb := s.heartbeats.Load()
			eventually(t, func() bool { return s.heartbeats.Load() > hb }, "heartbeats keep coming")
		})

		t.Run("a client disconnect ends the handler", func(t *testing.T) {
			eventually(t, func() bool { return hub.Stats().Connections == 0 }, "the earlier streams ended")
			s := openSSE(t, app.events([]string{ch, "other"}), header("X-User", "u1"))
			require.EqualValues(t, 1, hub.Stats().Connections)
			require.EqualValues(t, 3, hub.Stats().Channels, "two channels and the user's channel of Disconnect")
			s.Close()
			eventually(t, func() bool { return hub.Stats().Connections == 0 && app.Active.Load() == 0 }, "the handler returned")
			eventually(t, func() bool { return hub.Stats().Channels == 0 }, "the hub unsubscribed after its grace")
		})

		t.Run("Serve over plain net/http", func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
				if err := hub.Serve(w, req, Stream{Channels: []string{ch}, Heartbeat: time.Hour}); err != nil {
					http.Error(w, "refused", http.StatusServiceUnavailable)
				}
			}))
			t.Cleanup(func() { srv.CloseClientConnections(); srv.Close() })
			s := openSSE(t, srv.URL, nil)
			publish(t, hub, ch, "", "plain")
			require.Equal(t, "plain", s.Next(t).Data)
			require.Equal(t, "3000", s.retry.Load(), "the default retry hint")
		})
	})
}

func TestRealtimeOverHTTP2(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		e := echo.New()
		e.GET("/events", SSEWithConfig(SSEConfig{Hub: hub}))
		srv := httptest.NewUnstartedServer(e)
		srv.EnableHTTP2 = true
		srv.StartTLS()
		t.Cleanup(func() { srv.CloseClientConnections(); srv.Close() })
		hc := srv.Client()

		// Several streams share one HTTP/2 connection.
		var streams []*sseStream
		for i := range 8 {
			s := openSSEWith(t, hc, srv.URL+"/events?channels=h2", nil)
			require.Equal(t, 2, s.Resp.ProtoMajor, "stream %d", i)
			require.Empty(t, s.Resp.Header.Get("Connection"), "no connection-specific header in HTTP/2")
			streams = append(streams, s)
		}
		publishSeq(t, hub, "h2", "h", 1, 5)
		for _, s := range streams {
			require.Equal(t, seq("h", 1, 5), s.Data(t, 5))
		}
		// Closing one stream (an HTTP/2 stream reset) ends its handler only.
		streams[0].Close()
		eventually(t, func() bool { return hub.Stats().Connections == 7 }, "one stream ended")
		publish(t, hub, "h2", "", "after")
		for _, s := range streams[1:] {
			require.Equal(t, "after", s.Next(t).Data)
		}
	})
}

// ---------------------------------------------------------------------------
// Shutdown

func TestRealtimeShutdown(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		app := newRTApp(t, hub, nil, nil)
		other := newTestHub(t, r, r.Client(), nil)
		otherApp := newRTApp(t, other, nil, nil)
		a := openSSE(t, app.events([]string{"one"}), nil)
		b := openSSE(t, app.events([]string{"one", "two"}), header("X-User", "u"))
		publish(t, other, "one", "", "one-1")
		publish(t, other, "two", "", "two-1")
		require.Equal(t, "one-1", a.Next(t).Data)
		require.ElementsMatch(t, []string{"one-1", "two-1"}, b.Data(t, 2))

		require.NoError(t, hub.Shutdown(ctx5s(t)))
		requireDisconnected(t, a, "shutdown")
		last := requireDisconnected(t, b, "shutdown")

		// As in a rolling deploy, the client reconnects to another
		// instance with the disconnect event's id and misses nothing.
		publish(t, other, "one", "", "one-2")
		publish(t, other, "two", "", "two-2")
		moved := openSSE(t, otherApp.events([]string{"one", "two"}), header("Last-Event-ID", last.ID))
		require.ElementsMatch(t, []string{"one-2", "two-2"}, moved.Data(t, 2))
		moved.Quiet(t)
		require.Zero(t, hub.Stats().Connections)
		eventually(t, func() bool { return app.Active.Load() == 0 }, "the handlers returned")
		require.Equal(t, map[string]any{"error": "realtime unavailable"}, errorJSON(t, app.events([]string{"one"}), nil, http.StatusServiceUnavailable))
		require.NoError(t, hub.Shutdown(ctx5s(t)), "Shutdown twice is fine")

		// Registered with http.Server.RegisterOnShutdown, it lets the
		// server's own Shutdown finish instead of waiting for its deadline.
		hub2 := newTestHub(t, r, r.Client(), nil)
		app2 := newRTApp(t, hub2, nil, func(srv *http.Server) {
			srv.RegisterOnShutdown(func() { _ = hub2.Shutdown(context.Background()) })
		})
		c := openSSE(t, app2.events([]string{"one"}), nil)
		ctx, cancel := context.WithTimeout(context.Background(), rtWait)
		defer cancel()
		require.NoError(t, app2.Config.Shutdown(ctx))
		requireDisconnected(t, c, "shutdown")
	})
}

// ---------------------------------------------------------------------------
// Redis down

func TestRealtimeRedisDown(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		const timeout = 300 * time.Millisecond
		fast := func(cfg *HubConfig) {
			cfg.Timeout = timeout
			cfg.Breaker = NewBreaker(BreakerConfig{Failures: 2, Cooldown: 300 * time.Millisecond, Logger: discardLogger()})
		}
		hub := newTestHub(t, f.testRedis, f.Client(), fast)
		app := newRTApp(t, hub, func(cfg *SSEConfig) { cfg.Heartbeat = 50 * time.Millisecond }, nil)
		const ch = "down"

		s := openSSE(t, app.events([]string{ch}), nil)
		publishSeq(t, hub, ch, "d", 1, 2)
		require.Equal(t, seq("d", 1, 2), s.Data(t, 2))

		f.Pause(t)
		// Publish fails within its deadline, long before the caller's.
		for i := range 3 {
			ctx, cancel := context.WithTimeout(context.Background(), rtWait)
			_, err := hub.Publish(ctx, ch, Event{Data: []byte(fmt.Sprintf("during-%d", i))})
			require.Error(t, err)
			require.NoError(t, ctx.Err(), "Publish returned within its own deadline")
			cancel()
		}
		// A new stream is refused with 503 JSON, no internal text.
		body := errorJSON(t, app.events([]string{ch}), nil, http.StatusServiceUnavailable)
		require.Equal(t, map[string]any{"error": "realtime unavailable"}, body)
		// The open stream stays open and keeps its heartbeats.
		hb := s.heartbeats.Load()
		eventually(t, func() bool { return s.heartbeats.Load() >= hb+3 }, "heartbeats while Redis is down")
		f.Resume(t)

		// It catches up from the stream: every event Redis stored, once.
		publishEventually(t, hub, ch, "back")
		requireStreamed(t, s, f.testRedis, ch, 2, "the open stream caught up")
		eventually(t, func() bool {
			req, _ := http.NewRequest(http.MethodGet, app.events([]string{ch}), nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			resp, err := http.DefaultClient.Do(req.WithContext(ctx))
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		}, "new streams are served again")
	})
}

// ---------------------------------------------------------------------------
// Presence

func TestRealtimePresence(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		short := func(name string) func(*HubConfig) {
			return func(cfg *HubConfig) {
				cfg.Instance = name
				cfg.PresenceInterval = 100 * time.Millisecond
				cfg.PresenceTTL = 400 * time.Millisecond
			}
		}
		hubA := newTestHub(t, r, r.Client(), short("inst-a"))
		hubB := newTestHub(t, r, r.Client(), short("inst-b"))
		require.Equal(t, "inst-a", hubA.Instance())
		appA, appB := newRTApp(t, hubA, nil, nil), newRTApp(t, hubB, nil, nil)
		const room = "present"
		before := time.Now().Add(-time.Minute)

		alice := openSSE(t, appA.events([]string{room}), header("X-User", "alice"))
		aliceConn := appA.start(t).ConnID
		bob := openSSE(t, appB.events([]string{room, "elsewhere"}), header("X-User", "bob"))
		bobConn := appB.start(t).ConnID
		openSSE(t, appB.events([]string{room}), nil)
		anonConn := appB.start(t).ConnID

		type who struct{ conn, user, instance string }
		members := func(p PresenceInfo) []who {
			var out []who
			for _, m := range p.Members {
				require.True(t, m.Since.After(before) && m.Since.Before(time.Now().Add(time.Minute)), "since %v", m.Since)
				out = append(out, who{m.ConnID, m.UserID, m.Instance})
			}
			return out
		}
		p, err := hubA.Presence(ctx5s(t), room, 0)
		require.NoError(t, err)
		require.Equal(t, room, p.Channel)
		require.Equal(t, 3, p.Count)
		require.ElementsMatch(t, []who{{aliceConn, "alice", "inst-a"}, {bobConn, "bob", "inst-b"}, {anonConn, "", "inst-b"}}, members(p))

		p, err = hubB.Presence(ctx5s(t), room, 1)
		require.NoError(t, err)
		require.Equal(t, 3, p.Count, "the count is of every member")
		require.Len(t, p.Members, 1, "the list stops at the limit")

		p, err = hubB.Presence(ctx5s(t), "nobody-here", 0)
		require.NoError(t, err)
		require.Zero(t, p.Count)
		require.Empty(t, p.Members)

		// A stream that ends says goodbye.
		bob.Close()
		eventually(t, func() bool {
			p, err := hubA.Presence(ctx5s(t), room, 0)
			return err == nil && p.Count == 2
		}, "bob left")
		p, err = hubA.Presence(ctx5s(t), room, 0)
		require.NoError(t, err)
		require.ElementsMatch(t, []who{{aliceConn, "alice", "inst-a"}, {anonConn, "", "inst-b"}}, members(p))
		_ = alice
		_, err = hubA.Presence(ctx5s(t), "", 0)
		require.ErrorIs(t, err, ErrInvalidChannel)

		// Shutdown says goodbye at once, not after PresenceTTL.
		require.NoError(t, hubB.Shutdown(ctx5s(t)))
		p, err = hubA.Presence(ctx5s(t), room, 0)
		require.NoError(t, err)
		require.Equal(t, []who{{aliceConn, "alice", "inst-a"}}, members(p), "inst-b's members left with it")

		// An instance that dies without goodbye (no Shutdown, its client
		// gone) disappears once its entries expire.
		deadClient := r.Client()
		hubC := newTestHub(t, r, deadClient, short("inst-c"))
		appC := newRTApp(t, hubC, nil, nil)
		openSSE(t, appC.events([]string{room}), header("X-User", "carol"))
		eventually(t, func() bool {
			p, err := hubA.Presence(ctx5s(t), room, 0)
			return err == nil && p.Count == 2
		}, "carol joined")
		deadClient.Close()
		eventually(t, func() bool {
			p, err := hubA.Presence(ctx5s(t), room, 0)
			if err != nil || p.Count != 1 {
				return false
			}
			for _, m := range p.Members {
				if m.Instance == "inst-c" {
					return false
				}
			}
			return true
		}, "the dead instance's members expired")
	})
}

// ---------------------------------------------------------------------------
// Hostile positions

func TestRealtimeHostilePositions(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		app := newRTApp(t, hub, nil, nil)
		const ch = "hostile"

		// A real id of this channel, and one of another channel.
		s := openSSE(t, app.events([]string{ch}), nil)
		publishSeq(t, hub, ch, "h", 1, 3)
		s.Data(t, 3)
		real := s.LastID()
		s.Close()
		o := openSSE(t, app.events([]string{"other"}), nil)
		publish(t, hub, "other", "", "o")
		o.Next(t)
		foreign := o.LastID()
		o.Close()
		segs := strings.Split(real, ".")
		require.Len(t, segs, 2, real)
		seg := segs[1]
		require.Greater(t, len(seg), 12, real)

		for _, tc := range []struct {
			name, id string
		}{
			{"garbage", "garbage"},
			{"version only", "1"},
			{"empty segment", "1."},
			{"unknown version", "2." + seg},
			{"foreign channel", foreign},
			{"short segment", "1." + seg[:10]},
			{"offset not base36", "1." + seg[:12] + "!!"},
			{"offset overflows uint64", "1." + seg[:12] + strings.Repeat("z", 30)},
			{"negative offset", "1." + seg[:12] + "-1"},
			{"2049 bytes", "1." + seg + strings.Repeat(".AAAAAAAAAAAA1", 146)},
			{"64 KiB", strings.Repeat("1", 64<<10)},
			{"non-UTF-8", "1.\xff\xfe" + seg[2:]},
			{"NUL bytes", "1." + seg[:6] + "\x00\x00\x00\x00\x00\x001"},
			{"many dots", strings.Repeat(".", 2000)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				for _, via := range []string{"header", "query"} {
					u, hdr := app.events([]string{ch}), http.Header{}
					if via == "header" {
						if strings.ContainsAny(tc.id, "\x00\r\n") || len(tc.id) > 8<<10 {
							continue // not a valid header value; the query carries it
						}
						hdr.Set("Last-Event-ID", tc.id)
					} else {
						u = app.events([]string{ch}, "lastEventId", tc.id)
					}
					s, st := app.open(t, u, hdr)
					require.False(t, st.Channels[0].Resumed, via)
					require.False(t, st.Channels[0].Reset, via)
					publish(t, hub, ch, "", "live "+tc.name)
					require.Equal(t, "live "+tc.name, s.Next(t).Data, "%s: the stream starts live", via)
					s.Close()
				}
			})
		}

		// A channel named twice, a position from the future of the live
		// epoch, or of an epoch this channel never had, never break the
		// stream either, and replay nothing that was not missed.
		for _, id := range []string{
			real + "." + seg, // the same channel twice
			"1." + seg[:12] + "zzzzzz",
			"1." + seg[:6] + "ZZZZZZ" + seg[12:],
		} {
			s := openSSE(t, app.events([]string{ch}), header("Last-Event-ID", id))
			publish(t, hub, ch, "", "live")
			got := s.Until(t, "live")
			require.NotContains(t, got[:len(got)-1], "h-1", "nothing is replayed from a position the channel never had")
			s.Close()
		}
	})
}

func FuzzDecodeStreamID(f *testing.F) {
	for _, s := range []string{"", "1", "1.", "1.k3F9aQXy3kQ916", "1.k3F9aQXy3kQ916.Zz01bcXy3kQ91", "1..", "2.k3F9aQXy3kQ916",
		"1.k3F9aQXy3kQ9zzzzzzzzzzzzzzzzzzzz", strings.Repeat("1.k3F9aQXy3kQ91", 200)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		got, ok := decodeStreamID(id)
		if len(id) > 2048 {
			require.False(t, ok, "ids over 2048 bytes are refused")
		}
		if !ok {
			return
		}
		// Each position takes at least 14 bytes: ".", 6, 6 and one digit.
		require.LessOrEqual(t, len(got), (len(id)-1)/14, "positions decoded from %q", id)
		require.LessOrEqual(t, len(got), maxStreamIDEntries)
		// Only the canonical encoding is accepted: it re-encodes to itself.
		hashes, pos := make([]string, len(got)), make([]Position, len(got))
		for i, e := range got {
			hashes[i], pos[i] = e.hash, e.pos
		}
		require.Equal(t, id, string(appendStreamID(nil, hashes, pos)))
	})
}

// ---------------------------------------------------------------------------
// Slot migration

func TestRealtimeStreamStaysExactAcrossSlotMigration(t *testing.T) {
	f := newFaultRedis(t, "cluster")
	hub := newTestHub(t, f.testRedis, f.Client(), nil)
	pub := newTestHub(t, f.testRedis, f.Client(), nil)
	app := newRTApp(t, hub, nil, nil)
	const ch = "migrating"

	s := openSSE(t, app.events([]string{ch}), nil)
	publish(t, pub, ch, "", "m-0")
	require.Equal(t, "m-0", s.Next(t).Data)
	key := streamKey(t, f.testRedis, ch)
	slot := keySlot(key)

	rereads := hub.Stats().Rereads
	stop := make(chan struct{})
	wait := runPublisher(pub, ch, "m", 3*time.Millisecond, stop)
	time.Sleep(100 * time.Millisecond)
	moveSlot(t, f, slot)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	require.Positive(t, wait())
	publishEventually(t, pub, ch, "final")

	requireStreamed(t, s, f.testRedis, ch, 1, "the stream stayed exact across the migration")
	require.Greater(t, hub.Stats().Rereads, rereads, "the sunsubscribe made the hub resubscribe and re-read")
	truth := streamData(t, f.testRedis, ch)
	owner, err := slotOwner(f, slot)
	require.NoError(t, err)
	t.Logf("slot %d moved; %d events; now on %s", slot, len(truth), owner)
}

// streamKey returns the key of channel's stream (see streamData).
func streamKey(t *testing.T, r *testRedis, channel string) string {
	t.Helper()
	for _, k := range prefixKeys(t, r) {
		if strings.HasSuffix(k, ":s:"+channel) {
			return k
		}
	}
	t.Fatalf("no stream key for %q", channel)
	return ""
}

// ---------------------------------------------------------------------------
// Configuration and limits

func TestRealtimeConfigValidation(t *testing.T) {
	c := standaloneClient(t)
	for _, tc := range []struct {
		name string
		mod  func(*HubConfig)
	}{
		{"no client", func(cfg *HubConfig) { cfg.Client = nil }},
		{"braces in the prefix", func(cfg *HubConfig) { cfg.Prefix = "a{b}:" }},
		{"negative MaxLen", func(cfg *HubConfig) { cfg.MaxLen = -1 }},
		{"negative Partitions", func(cfg *HubConfig) { cfg.Partitions = -1 }},
		{"too many Partitions", func(cfg *HubConfig) { cfg.Partitions = 1025 }},
		{"negative HistoryTTL", func(cfg *HubConfig) { cfg.HistoryTTL = -time.Second }},
		{"MetaTTL below HistoryTTL", func(cfg *HubConfig) { cfg.HistoryTTL, cfg.MetaTTL = time.Hour, time.Minute }},
		{"negative MaxEventSize", func(cfg *HubConfig) { cfg.MaxEventSize = -1 }},
		{"negative ClientQueueEvents", func(cfg *HubConfig) { cfg.ClientQueueEvents = -1 }},
		{"negative ClientQueueBytes", func(cfg *HubConfig) { cfg.ClientQueueBytes = -1 }},
		{"negative ReplayPage", func(cfg *HubConfig) { cfg.ReplayPage = -1 }},
		{"PresenceTTL not above PresenceInterval", func(cfg *HubConfig) { cfg.PresenceInterval, cfg.PresenceTTL = time.Second, time.Second }},
		{"negative MaxConnections", func(cfg *HubConfig) { cfg.MaxConnections = -1 }},
		{"Instance with a bar", func(cfg *HubConfig) { cfg.Instance = "a|b" }},
		{"Instance with a newline", func(cfg *HubConfig) { cfg.Instance = "a\nb" }},
		{"Instance of 129 bytes", func(cfg *HubConfig) { cfg.Instance = strings.Repeat("i", 129) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := HubConfig{Client: c}
			tc.mod(&cfg)
			_, err := NewHub(cfg)
			require.Error(t, err)
		})
	}

	hub, err := NewHub(HubConfig{Client: c, Options: Options{Logger: discardLogger()}})
	require.NoError(t, err, "the zero config with a client is valid")
	require.NotEmpty(t, hub.Instance(), "an instance name by default")
	require.NoError(t, hub.Shutdown(ctx5s(t)), "a hub that never streamed shuts down")
	other, err := NewHub(HubConfig{Client: c, Options: Options{Logger: discardLogger()}})
	require.NoError(t, err)
	require.NotEqual(t, hub.Instance(), other.Instance(), "instance names differ by default")
	t.Cleanup(func() { _ = other.Shutdown(context.Background()) })

	for _, tc := range []struct {
		name string
		cfg  SSEConfig
	}{
		{"no hub", SSEConfig{}},
		{"negative MaxChannels", SSEConfig{Hub: other, MaxChannels: -1}},
		{"negative Heartbeat", SSEConfig{Hub: other, Heartbeat: -time.Second}},
		{"negative Retry", SSEConfig{Hub: other, Retry: -time.Second}},
		{"negative AliveInterval", SSEConfig{Hub: other, AliveInterval: -time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.cfg.ToHandler()
			require.Error(t, err)
			require.Panics(t, func() { SSEWithConfig(tc.cfg) })
		})
	}
	_, err = SSEConfig{Hub: other}.ToHandler()
	require.NoError(t, err)
	require.NotNil(t, SSE(other, "fixed"))
}

func TestRealtimeHubFull(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) { cfg.MaxConnections = 2 })
		app := newRTApp(t, hub, nil, nil)
		a := openSSE(t, app.events([]string{"one"}), nil)
		openSSE(t, app.events([]string{"two"}), nil)
		require.Equal(t, map[string]any{"error": "realtime unavailable"},
			errorJSON(t, app.events([]string{"three"}), nil, http.StatusServiceUnavailable))
		a.Close()
		eventually(t, func() bool { return hub.Stats().Connections == 1 }, "a slot is free again")
		openSSE(t, app.events([]string{"three"}), nil)
	})
}

func TestRealtimeFixedChannels(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		e := echo.New()
		e.GET("/news", SSE(hub, "news", "alerts"))
		e.GET("/any", SSE(hub))
		srv := httptest.NewServer(e)
		t.Cleanup(func() { srv.CloseClientConnections(); srv.Close() })

		// The query cannot change fixed channels.
		s := openSSE(t, srv.URL+"/news?channels=secret", nil)
		publish(t, hub, "secret", "", "not for you")
		publish(t, hub, "alerts", "", "alert")
		require.Equal(t, "alert", s.Next(t).Data)
		// Without fixed channels, the query decides.
		q := openSSE(t, srv.URL+"/any?channels=secret", nil)
		publish(t, hub, "secret", "", "for the query")
		require.Equal(t, "for the query", q.Next(t).Data)
		s.Quiet(t)
	})
}

// openStuck opens a stream over a connection with a tiny receive buffer,
// reads its headers and first bytes, and then never reads again.
func openStuck(t *testing.T, app *rtApp, channel string, hdr ...string) net.Conn {
	t.Helper()
	conn := dialTinyReceiveBuffer(t, app.Listener.Addr().String())
	req := fmt.Sprintf("GET /events?channels=%s HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n", channel)
	for i := 0; i+1 < len(hdr); i += 2 {
		req += hdr[i] + ": " + hdr[i+1] + "\r\n"
	}
	_, err := io.WriteString(conn, req+"\r\n")
	require.NoError(t, err)
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(rtWait)))
	br := bufio.NewReaderSize(conn, 16)
	for {
		line, err := br.ReadString('\n')
		require.NoError(t, err, "the stream starts")
		if strings.HasPrefix(line, "HTTP/1.1 ") {
			require.Contains(t, line, "200", "the stream starts")
		}
		if strings.HasPrefix(line, ": connected") {
			return conn
		}
	}
}

func TestRealtimeStuckClientsCannotHoldTheServer(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) { cfg.MaxLen = 200 })
		pub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) { cfg.MaxLen = 200 })
		app := newRTApp(t, hub, nil, nil)
		const ch = "stuck"
		payload := strings.Repeat("y", 40_000)

		s := openSSE(t, app.events([]string{ch}), nil)
		publish(t, pub, ch, "", "first")
		require.Equal(t, "first", s.Next(t).Data)
		from := s.LastID()
		s.Close()
		for i := range 200 {
			publish(t, pub, ch, "", fmt.Sprintf("%d %s", i, payload))
		}

		// A client that stops reading in the middle of its replay (8 MB
		// behind, more than loopback buffers) is ended by Disconnect at
		// once, not after the write timeout.
		openStuck(t, app, ch, "Last-Event-ID", from, "X-User", "stuck")
		eventually(t, func() bool { return hub.Stats().Connections == 1 }, "the replaying stream is open")
		time.Sleep(200 * time.Millisecond) // let the replay fill the socket
		require.EqualValues(t, 1, app.Active.Load(), "the replay is stuck writing")
		require.NoError(t, hub.Disconnect(ctx5s(t), "stuck"))
		eventually(t, func() bool { return app.Active.Load() == 0 && hub.Stats().Connections == 0 }, "the stuck replay ended")

		// Live clients that stopped reading (their queues are not full
		// yet) do not hold Shutdown either.
		for range 3 {
			openStuck(t, app, ch)
		}
		normal := openSSE(t, app.events([]string{ch}), nil)
		for i := range 60 {
			d := fmt.Sprintf("live %d %s", i, payload)
			publish(t, pub, ch, "", d)
			require.Equal(t, d, normal.Next(t).Data)
		}
		ctx, cancel := context.WithTimeout(context.Background(), rtWait)
		defer cancel()
		require.NoError(t, hub.Shutdown(ctx), "Shutdown returns before its deadline")
		requireDisconnected(t, normal, "shutdown")
		eventually(t, func() bool { return app.Active.Load() == 0 }, "every handler returned")
		require.Zero(t, hub.Stats().Connections)
	})
}

func TestRealtimeUnusualChannelNames(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), nil)
		pub := newTestHub(t, r, r.Client(), nil)
		app := newRTApp(t, hub, nil, nil)
		// Names that must not move keys between slots or break the
		// escaping, and the longest allowed, 16 of them in one stream.
		names := []string{"{x}", "a}b{c", "{}", "100%", "ü-ñ-中文", "a:b:c", "with space", "*?[]\\",
			strings.Repeat("L", 256), strings.Repeat("{", 256), strings.Repeat("é", 128)}
		for i := len(names); i < 16; i++ {
			names = append(names, fmt.Sprintf("%s%03d", strings.Repeat("n", 253), i))
		}
		s := openSSE(t, app.events(names), nil)
		for i, n := range names {
			publish(t, pub, n, "", fmt.Sprintf("one %d", i))
		}
		got := s.Data(t, len(names))
		sort.Strings(got)
		want := make([]string, len(names))
		for i := range names {
			want[i] = fmt.Sprintf("one %d", i)
		}
		sort.Strings(want)
		require.Equal(t, want, got)
		id := s.LastID()
		require.Equal(t, 16, strings.Count(id, "."))
		require.LessOrEqual(t, len(id), 16*26+1, "at most 26 bytes per channel")
		s.Close()

		// Every channel resumes from the one id.
		for i, n := range names {
			publish(t, pub, n, "", fmt.Sprintf("two %d", i))
		}
		s = openSSE(t, app.events(names), header("Last-Event-ID", id))
		got = s.Data(t, len(names))
		for i := range want {
			want[i] = strings.Replace(want[i], "one", "two", 1)
		}
		sort.Strings(got)
		sort.Strings(want)
		require.Equal(t, want, got)
	})
}

// subscribedChannels returns the pub/sub channels under the test's prefix
// that some node has subscribers for (PUBSUB CHANNELS and SHARDCHANNELS).
func subscribedChannels(t *testing.T, r *testRedis) []string {
	t.Helper()
	var out []string
	pattern := matchPattern(r.Keys.Prefix()) + "*"
	for _, addr := range r.addrs {
		for _, sub := range []string{"CHANNELS", "SHARDCHANNELS"} {
			v, err := respDo(addr, 2*time.Second, "PUBSUB", sub, pattern)
			require.NoError(t, err)
			for _, c := range v.([]any) {
				out = append(out, c.(string))
			}
		}
	}
	sort.Strings(out)
	return slices.Compact(out)
}

func TestRealtimeSubscriptionsFollowLocalInterest(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) { cfg.UnsubscribeGrace = 300 * time.Millisecond })
		app := newRTApp(t, hub, nil, nil)
		require.Empty(t, subscribedChannels(t, r), "a hub without streams subscribes to nothing")

		s := openSSE(t, app.events([]string{"wanted"}), nil)
		subs := subscribedChannels(t, r)
		require.Len(t, subs, 1, "%v", subs)
		require.True(t, strings.HasSuffix(subs[0], ":wanted"), subs[0])
		publishSeq(t, hub, "unwanted", "u", 1, 20)
		publish(t, hub, "wanted", "", "w")
		require.Equal(t, "w", s.Next(t).Data)
		require.EqualValues(t, 1, hub.Stats().Delivered, "the instance got only what its clients listen to")

		// A reconnect within the grace keeps the subscription; the last
		// client leaving drops it after the grace.
		s.Close()
		s = openSSE(t, app.events([]string{"wanted"}), nil)
		require.Len(t, subscribedChannels(t, r), 1)
		require.EqualValues(t, 1, hub.Stats().Channels)
		s.Close()
		eventually(t, func() bool { return len(subscribedChannels(t, r)) == 0 && hub.Stats().Channels == 0 }, "unsubscribed after the grace")
	})
}

func TestRealtimeConcurrentStreams(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hubs := []*Hub{newTestHub(t, r, r.Client(), nil), newTestHub(t, r, r.Client(), nil)}
		apps := []*rtApp{newRTApp(t, hubs[0], nil, nil), newRTApp(t, hubs[1], nil, nil)}
		stop := make(chan struct{})
		var pubs sync.WaitGroup
		for i := range 4 {
			pubs.Add(1)
			go func() {
				defer pubs.Done()
				for n := 0; ; n++ {
					select {
					case <-stop:
						return
					default:
					}
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					_, err := hubs[n%2].Publish(ctx, fmt.Sprintf("c%d", (i+n)%6), Event{Data: []byte(strconv.Itoa(n))})
					cancel()
					if err != nil {
						t.Errorf("publish: %v", err)
						return
					}
				}
			}()
		}
		// Clients come and go on random instances and channel sets, some
		// resuming, some disconnected by user, while events flow.
		var clients sync.WaitGroup
		for i := range 16 {
			clients.Add(1)
			go func() {
				defer clients.Done()
				id := ""
				for round := range 6 {
					app := apps[(i+round)%2]
					chs := []string{fmt.Sprintf("c%d", i%6), fmt.Sprintf("c%d", (i+round)%6+6)}
					if chs[0] == chs[1] {
						chs = chs[:1]
					}
					req, _ := http.NewRequest(http.MethodGet, app.events(chs), nil)
					req.Header.Set("X-User", fmt.Sprintf("u%d", i%3))
					if id != "" {
						req.Header.Set("Last-Event-ID", id)
					}
					ctx, cancel := context.WithTimeout(context.Background(), rtWait)
					resp, err := http.DefaultClient.Do(req.WithContext(ctx))
					if err != nil {
						cancel()
						t.Errorf("stream: %v", err)
						return
					}
					if resp.StatusCode != http.StatusOK {
						t.Errorf("stream: %d", resp.StatusCode)
					}
					n := 0
					_ = readSSE(bufio.NewReader(resp.Body), func(string) {}, func(string) {}, func(ev sseEvent) {
						if ev.ID != "" && ev.Name != "disconnect" {
							id = ev.ID
						}
						if ev.Name == "" {
							return // the start position: not an event
						}
						if n++; n == 5+round*3 {
							cancel()
						}
					})
					cancel()
					_ = resp.Body.Close()
				}
			}()
		}
		for range 5 {
			time.Sleep(50 * time.Millisecond)
			_ = hubs[0].Disconnect(ctx5s(t), "u0")
		}
		clients.Wait()
		close(stop)
		pubs.Wait()
		for i, h := range hubs {
			eventually(t, func() bool { return h.Stats().Connections == 0 && apps[i].Active.Load() == 0 }, "hub %d has no streams left", i)
			eventually(t, func() bool { return h.Stats().Channels == 0 }, "hub %d unsubscribed everything", i)
		}
		eventually(t, func() bool { return len(subscribedChannels(t, r)) == 0 }, "Redis holds no subscription")
	})
}

func TestRealtimeBurstsArriveExactlyOnceInOrder(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		roomy := func(cfg *HubConfig) {
			cfg.MaxLen = 20_000
			cfg.ClientQueueEvents = 50_000 // the test's reader may lag; this is not the slow-client test
			cfg.ClientQueueBytes = 64 << 20
		}
		hubs := []*Hub{newTestHub(t, r, r.Client(), roomy), newTestHub(t, r, r.Client(), roomy)}
		apps := []*rtApp{newRTApp(t, hubs[0], nil, nil), newRTApp(t, hubs[1], nil, nil)}
		const ch = "burst"
		streams := []*sseStream{openSSE(t, apps[0].events([]string{ch}), nil), openSSE(t, apps[1].events([]string{ch}), nil)}

		// Eight publishers at once, from both instances, as fast as Redis
		// takes them: the hubs' hand-off may overflow, and then re-reads
		// the stream instead of dropping.
		const publishers, each = 8, 800
		var wg sync.WaitGroup
		for p := range publishers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range each {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					_, err := hubs[p%2].Publish(ctx, ch, Event{Data: []byte(fmt.Sprintf("%d/%d", p, i))})
					cancel()
					if err != nil {
						t.Errorf("publish: %v", err)
						return
					}
				}
			}()
		}
		wg.Wait()
		publish(t, hubs[0], ch, "", "end")
		truth := streamData(t, r, ch)
		require.Len(t, truth, publishers*each+1)
		for i, s := range streams {
			require.Equal(t, truth, s.Until(t, "end"), "stream %d got the stream's events, once, in its order", i)
		}
		t.Logf("rereads: %d, %d", hubs[0].Stats().Rereads, hubs[1].Stats().Rereads)
	})
}

// TestRealtimeOverflowingHandOffRereads stalls the hub's delivery (the
// test holds the channel's lock, as a stuck worker would) while more
// events arrive than its hand-off queue holds: the reader must not block,
// and once delivery resumes the client gets every event from the stream.
func TestRealtimeOverflowingHandOffRereads(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) {
			cfg.Partitions = 1
			cfg.MaxLen = 20_000
			cfg.ClientQueueEvents = 50_000
			cfg.ClientQueueBytes = 64 << 20
		})
		pub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) {
			cfg.Partitions = 1 // instances must agree on it
			cfg.MaxLen = 20_000
		})
		app := newRTApp(t, hub, nil, nil)
		const ch = "overflow"
		s := openSSE(t, app.events([]string{ch}), nil)
		publish(t, pub, ch, "", "warm")
		require.Equal(t, "warm", s.Next(t).Data)

		hub.mu.Lock()
		hc := hub.chans[ch]
		hub.mu.Unlock()
		require.NotNil(t, hc)
		rereads := hub.Stats().Rereads
		hc.mu.Lock()
		locked := true
		defer func() {
			if locked {
				hc.mu.Unlock()
			}
		}()
		var wg sync.WaitGroup
		for p := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range (inboxSize + 1000) / 4 {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					_, err := pub.Publish(ctx, ch, Event{Data: []byte(fmt.Sprintf("%d/%d", p, i))})
					cancel()
					if err != nil {
						t.Errorf("publish: %v", err)
						return
					}
				}
			}()
		}
		wg.Wait()
		eventually(t, hc.reread.Load, "the overflowing announcement marked the channel for a re-read")
		hc.mu.Unlock()
		locked = false

		publish(t, pub, ch, "", "end")
		truth := streamData(t, r, ch)
		require.Equal(t, truth[1:], s.Until(t, "end"), "every event, once, in the stream's order")
		require.Greater(t, hub.Stats().Rereads, rereads)
	})
}

// TestRealtimeOneMasterDown pauses the master of one channel's partition:
// streams of that channel are refused with 503 once its node's breaker
// opens, while channels on the other masters keep streaming, and the
// paused channel catches up when its master returns.
//
// It fails today: the presence refresh goes through rueidis Lua.ExecMulti
// (backend.ExecMulti), which sends SCRIPT LOAD to every node first, so one
// paused master fails the refresh of every master, and the failures open
// the breakers of the healthy ones (their members expire, new streams on
// them get 503).
func TestRealtimeOneMasterDown(t *testing.T) {
	f := newFaultRedis(t, "cluster")
	fast := func(cfg *HubConfig) {
		cfg.Timeout = 300 * time.Millisecond
		cfg.Breaker = NewBreaker(BreakerConfig{Failures: 2, Cooldown: 300 * time.Millisecond, Logger: discardLogger()})
	}
	hub := newTestHub(t, f.testRedis, f.Client(), func(cfg *HubConfig) {
		fast(cfg)
		cfg.PresenceInterval = 200 * time.Millisecond
		cfg.PresenceTTL = 600 * time.Millisecond
	})
	pub := newTestHub(t, f.testRedis, f.Client(), fast)
	app := newRTApp(t, hub, nil, nil)

	// Two channels whose partitions live on different masters.
	owner := func(ch string) string {
		o, err := slotOwner(f, keySlot(hub.keysOf(ch).stream))
		require.NoError(t, err)
		return o
	}
	down, up := "room-0", ""
	for i := 1; up == ""; i++ {
		if c := fmt.Sprintf("room-%d", i); owner(c) != owner(down) {
			up = c
		}
	}
	var paused *redisServer
	for _, s := range f.Servers() {
		if s.addr() == owner(down) {
			paused = s
		}
	}
	require.NotNil(t, paused)

	sDown := openSSE(t, app.events([]string{down}), nil)
	sUp := openSSE(t, app.events([]string{up}), nil)
	publish(t, pub, down, "", "d-0")
	require.Equal(t, "d-0", sDown.Next(t).Data)

	f.Pause(t, paused)
	for range 3 {
		_, err := pub.Publish(ctx5s(t), down, Event{Data: []byte("during")})
		require.Error(t, err)
		_, _ = hub.Publish(ctx5s(t), down, Event{Data: []byte("during")})
	}
	require.Equal(t, map[string]any{"error": "realtime unavailable"},
		errorJSON(t, app.events([]string{down, up}), nil, http.StatusServiceUnavailable), "a stream with a channel on the paused master")

	// The other masters serve on: live events, presence (refreshed on
	// each master on its own: after a few PresenceTTLs the members of the
	// healthy masters are still there), and new streams.
	publish(t, pub, up, "", "u-1")
	require.Equal(t, "u-1", sUp.Next(t).Data)
	time.Sleep(3 * 600 * time.Millisecond)
	p, err := pub.Presence(ctx5s(t), up, 0)
	require.NoError(t, err)
	require.Equal(t, 1, p.Count, "the presence of a channel on a healthy master survives another master's pause")
	t.Logf("breaker of the serving hub: %+v", hub.b.breaker.Stats())
	fresh := openSSE(t, app.events([]string{up}), nil)
	publish(t, pub, up, "", "u-2")
	require.Equal(t, "u-2", sUp.Next(t).Data)
	require.Equal(t, "u-2", fresh.Next(t).Data)

	f.Resume(t, paused)
	publishEventually(t, pub, down, "d-back")
	requireStreamed(t, sDown, f.testRedis, down, 1, "the paused channel's stream caught up")
}

// TestRealtimeReplayPageBoundedInBytes: a stream read fetches at most about
// 1 MiB of events of MaxEventSize, whatever ReplayPage says, so a resuming
// client holds a bounded page.
func TestRealtimeReplayPageBoundedInBytes(t *testing.T) {
	client := newTestRedis(t, "standalone", standaloneRedis.addrs).Client()
	for _, tt := range []struct {
		name      string
		page, max int
		want      int
	}{
		{name: "defaults", want: 16},
		{name: "small events", max: 1 << 10, want: DefaultReplayPage},
		{name: "small page", page: 7, want: 7},
		{name: "huge events", max: 4 << 20, want: 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := HubConfig{Client: client, ReplayPage: tt.page, MaxEventSize: tt.max}
			if tt.max >= DefaultClientQueueBytes {
				cfg.ClientQueueBytes = 2 * tt.max
			}
			h, err := NewHub(cfg)
			require.NoError(t, err)
			require.Equal(t, tt.want, h.page)
		})
	}
}

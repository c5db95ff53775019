package redisecho

// Review tests of realtime.go: each proves one bug found in review (it
// failed before its fix) and stays as its regression test.

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
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

// An open stream loses nothing when its channel's history is lost (the
// meta hash evicted or expired after MetaTTL without a publish, or Redis
// restarted without persistence) and the channel then gets a new epoch:
// the first events of the new epoch are delivered (after a reset), and a
// Disconnect published as the first event of a user channel's new epoch
// still ends the user's streams. Before the fix the hub reset straight to
// the new epoch's top, skipping them: the room lost the event, and a
// logged-out user's stream stayed open.
func TestReviewNewEpochKeepsItsFirstEvents(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		h, srv := newReviewHub(t, r, HubConfig{})
		s := openReviewStream(t, srv.URL+"/events?channels=room&user=u1", nil)
		_, err := h.Publish(ctx, "room", Event{Name: "m", Data: []byte("one")})
		require.NoError(t, err)
		require.Equal(t, "one", s.nextEvent(t).data)

		// The room's history is lost; its next publish starts an epoch.
		admin := r.Client()
		require.NoError(t, admin.Do(ctx, admin.B().Del().Key(h.keysOf("room").meta).Build()).Error())
		_, err = h.Publish(ctx, "room", Event{Name: "m", Data: []byte("two")})
		require.NoError(t, err)
		require.Equal(t, "two", s.nextEvent(t).data, "the new epoch's first event reaches the open stream")

		// The same for the user channel: Disconnect is its new epoch's first event.
		require.NoError(t, admin.Do(ctx, admin.B().Del().Key(h.keysOf(userChannel("u1")).meta).Build()).Error())
		require.NoError(t, h.Disconnect(ctx, "u1"))
		f := s.nextEvent(t)
		require.Equal(t, "disconnect", f.event)
		require.JSONEq(t, `{"reason":"disconnected"}`, f.data)
	})
}

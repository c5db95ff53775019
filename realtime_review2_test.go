package redisecho

// Second review of realtime.go: each test proves one bug found in review
// (it failed before its fix) and stays as its regression test, or covers
// what changed since the first review (TestReview2ReconnectStorm...).

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/stretchr/testify/require"
)

// A stream whose OnStart panics (user code, recovered by Echo's Recover
// middleware) is unregistered all the same. Since Serve was split into
// open + stream, the unregistering defer was set only once open returned:
// the panicking stream stayed in the hub for good (Connections stuck at
// 1, its channel subscribed, its presence refreshed by a ghost), and
// Shutdown waited for its handler until its ctx ended.
func TestReview2PanickingOnStartLeavesNoGhostStream(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		h, err := NewHub(HubConfig{
			Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()},
			Partitions: 4, UnsubscribeGrace: 50 * time.Millisecond,
			PresenceInterval: 100 * time.Millisecond,
		})
		require.NoError(t, err)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_ = h.Shutdown(ctx)
		})
		e := echo.New()
		e.Logger.SetOutput(io.Discard)
		e.Use(middleware.RecoverWithConfig(middleware.RecoverConfig{DisablePrintStack: true}))
		e.GET("/events", SSEWithConfig(SSEConfig{
			Hub:     h,
			UserID:  func(echo.Context) string { return "u1" },
			OnStart: func(echo.Context, StreamStart) { panic("boom") },
		}))
		srv := httptest.NewServer(e)
		defer srv.Close()

		resp, err := http.Get(srv.URL + "/events?channels=room")
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body) // the handler ended: the body ends
		resp.Body.Close()

		require.Eventually(t, func() bool { return h.Stats().Connections == 0 }, 5*time.Second, 10*time.Millisecond,
			"the panicking stream is still registered")
		require.Eventually(t, func() bool { return h.Stats().Channels == 0 }, 5*time.Second, 10*time.Millisecond,
			"its channels are still subscribed")
		require.Eventually(t, func() bool {
			info, err := h.Presence(context.Background(), "room", 0)
			return err == nil && info.Count == 0
		}, 5*time.Second, 20*time.Millisecond, "a ghost stays in presence")

		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		require.NoError(t, h.Shutdown(ctx), "Shutdown waits for a handler that is gone")
	})
}

// NewHub accepts ClientQueueBytes down to MaxEventSize+64 so that "one
// large event" cannot drop every client as slow. But a queued event is
// counted encoded, and SSE encoding writes "data: " for every line: an
// event of MaxEventSize with many line breaks is several times larger
// encoded. Before the fix such an event, published once, dropped every
// stream of the channel as slow (a chat message with blank lines kicks
// the room), though the configuration was accepted.
func TestReview2QueueHoldsOneEventOfAnyShape(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		h, srv := newReviewHub(t, r, HubConfig{
			Options:          Options{Logger: discardLogger()},
			Partitions:       4,
			MaxEventSize:     1024,
			ClientQueueBytes: 1024 + 64, // the least NewHub accepts
		})
		s := openReviewStream(t, srv.URL+"/events?channels=room", nil)
		waitSynced(t, h, "room", 0)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := h.Publish(ctx, "room", Event{Name: "msg", Data: []byte(strings.Repeat("a\n", 510))})
		require.NoError(t, err)
		f := s.nextEvent(t)
		require.Equal(t, "msg", f.event, "the event, not %q %s", f.event, f.data)
		require.Equal(t, strings.Repeat("a", 510), f.data)
		require.Zero(t, h.Stats().DroppedSlow)
	})
}

// The hand-off queue's byte bound (maxInboxBytes, 16 MiB) counted the
// announcements' bytes, but the queue holds their SSE encoding, which is
// up to 7 times larger ("data: " per line): 64 KiB events of line breaks
// held about 117 MB per subscription connection (one per partition on a
// cluster) before the bound applied.
func TestReview2HandOffByteBoundCountsWhatItHolds(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		h, srv := newReviewHub(t, r, HubConfig{Options: Options{Logger: discardLogger()}, Partitions: 1})
		pub, err := NewHub(HubConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}, Partitions: 1})
		require.NoError(t, err)
		const ch = "lines"
		s := openReviewStream(t, srv.URL+"/events?channels="+ch, nil)
		waitSynced(t, h, ch, 0)
		h.mu.Lock()
		hc := h.chans[ch]
		h.mu.Unlock()

		data := []byte(strings.Repeat("\n", DefaultMaxEventSize-1))
		encoded := int64(encodeEvent("n", data).size())
		hc.mu.Lock() // the worker stops at this channel's first announcement
		locked := true
		defer func() {
			if locked {
				hc.mu.Unlock()
			}
		}()
		const n = 300
		for range n {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := pub.Publish(ctx, ch, Event{Name: "n", Data: data})
			cancel()
			require.NoError(t, err)
		}
		require.Eventually(t, hc.reread.Load, 10*time.Second, 10*time.Millisecond, "the bound was reached")
		held := int64(len(hc.conn.inbox)) * encoded
		hc.mu.Unlock()
		locked = false
		require.LessOrEqual(t, held, int64(maxInboxBytes)+encoded,
			"the hand-off queue holds %d events, %d MB", held/encoded, held>>20)
		_ = s
	})
}

// A reconnect storm: streams resuming on an instance new to their
// channels, more channels on one subscription connection than one batched
// first sync reads (syncBatch), all at once. Each stream gets exactly what
// it missed, then live events, on every channel.
func TestReview2ReconnectStormResumesExactly(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		const streams, perStream = 20, 16 // 320 channels > syncBatch
		h, srv := newReviewHub(t, r, HubConfig{Options: Options{Logger: discardLogger()}, Partitions: 1})
		pub, err := NewHub(HubConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}, Partitions: 1})
		require.NoError(t, err)
		publish := func(name, data string) Position {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			p, err := pub.Publish(ctx, name, Event{Data: []byte(data)})
			require.NoError(t, err)
			return p
		}
		names := make([][]string, streams)
		ids := make([]string, streams)
		for i := range streams {
			id := "1"
			for j := range perStream {
				name := fmt.Sprintf("storm-%d-%d", i, j)
				names[i] = append(names[i], name)
				p := publish(name, name+"/1")
				publish(name, name+"/2")
				publish(name, name+"/3")
				id += "." + channelHash(name) + p.Epoch + strconv.FormatUint(p.Offset, 36)
			}
			ids[i] = id
		}
		opened := make([]*reviewStream, streams)
		var wg sync.WaitGroup
		for i := range streams {
			wg.Add(1)
			go func() {
				defer wg.Done()
				opened[i] = openReviewStream(t, srv.URL+"/events?channels="+strings.Join(names[i], ","), map[string]string{"Last-Event-ID": ids[i]})
			}()
		}
		wg.Wait()
		for i, s := range opened {
			var got []string
			for range 2 * perStream {
				got = append(got, s.next(t).data)
			}
			var want []string
			for _, name := range names[i] {
				want = append(want, name+"/2", name+"/3")
			}
			require.ElementsMatch(t, want, got, "stream %d: the missed events, once, no reset", i)
		}
		for i := range streams {
			for _, name := range names[i] {
				publish(name, name+"/4")
			}
		}
		for i, s := range opened {
			var got, want []string
			for _, name := range names[i] {
				got = append(got, s.next(t).data)
				want = append(want, name+"/4")
			}
			require.Equal(t, want, got, "stream %d: live, in order", i)
		}
		require.Zero(t, h.Stats().Resets)
	})
}

// A slot migration sends a sunsubscribe for every channel of the slot the
// connection holds; each signalled "moved". The first made the hub
// resubscribe; the second stayed buffered and made the new connection,
// once subscribed, drop and resubscribe again at once: every slot move
// cost each channel of the partition two resubscribes and two re-reads
// (a storm of XRANGEs with many channels).
func TestReview2SlotMoveResubscribesOnce(t *testing.T) {
	f := newFaultRedis(t, "cluster")
	h, srv := newReviewHub(t, f.testRedis, HubConfig{Options: Options{Logger: discardLogger()}, Partitions: 4})
	var names []string
	part := h.keysOf("moving-0").part
	for i := 0; len(names) < 3; i++ {
		if n := fmt.Sprintf("moving-%d", i); h.keysOf(n).part == part {
			names = append(names, n)
		}
	}
	pub, err := NewHub(HubConfig{Client: f.Client(), Options: Options{Prefix: f.Keys.Prefix()}, Partitions: 4})
	require.NoError(t, err)
	for _, n := range names {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := pub.Publish(ctx, n, Event{Data: []byte("x")})
		cancel()
		require.NoError(t, err)
	}
	s := openReviewStream(t, srv.URL+"/events?channels="+strings.Join(names, ","), nil)
	for _, n := range names {
		waitSynced(t, h, n, 1)
	}
	before := h.Stats().Rereads
	moveSlot(t, f, keySlot(h.keysOf(names[0]).meta))
	require.Eventually(t, func() bool { return h.Stats().Rereads >= before+uint64(len(names)) }, 10*time.Second, 10*time.Millisecond,
		"the hub resubscribed after the move")
	time.Sleep(time.Second) // a second resubscribe would come within its 100 ms backoff
	require.Equal(t, before+uint64(len(names)), h.Stats().Rereads, "one resubscribe (one re-read per channel) per slot move")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = pub.Publish(ctx, names[1], Event{Data: []byte("after")})
	require.NoError(t, err)
	require.Equal(t, "after", s.next(t).data)
}

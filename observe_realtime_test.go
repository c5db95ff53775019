package redisecho

// Observability of the realtime hub (issue 14): the observations a Hub
// emits next to its HubStats counters, on real Redis, with real SSE
// clients.

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// observedHub returns a hub on its own client that reports to a new
// recorder, with mod applied after.
func observedHub(t *testing.T, r *testRedis, mod func(*HubConfig)) (*Hub, *recorder) {
	t.Helper()
	rec := newRecorder()
	h := newTestHub(t, r, r.Client(), func(cfg *HubConfig) {
		cfg.Options.Observer = rec
		if mod != nil {
			mod(cfg)
		}
	})
	return h, rec
}

// realtimeKinds are the kinds a Hub emits (besides the Redis calls and
// breaker changes of its backend).
var realtimeKinds = []ObsKind{ObsStreamOpen, ObsStreamClose, ObsPublish, ObsDeliver, ObsDropSlow, ObsResume, ObsReset}

// observedStats is HubStats as rec saw it: the connection gauge as opens
// minus closes, the counters as sums of N. Channels and Rereads are not
// observed.
func observedStats(rec *recorder) HubStats {
	n := func(k ObsKind) int64 { return rec.count(k, ResultNone) }
	return HubStats{
		Connections: n(ObsStreamOpen) - n(ObsStreamClose),
		Published:   uint64(n(ObsPublish)),
		Delivered:   uint64(n(ObsDeliver)),
		DroppedSlow: uint64(n(ObsDropSlow)),
		Resumes:     uint64(n(ObsResume)),
		Resets:      uint64(n(ObsReset)),
	}
}

// statsOf is h.Stats without the counters that are not observed.
func statsOf(h *Hub) HubStats {
	s := h.Stats()
	s.Channels, s.Rereads = 0, 0
	return s
}

// requireObservedStats waits for rec's view of h to settle on h's counters
// (an observation follows its counter by a moment) and requires them
// equal; it also requires every realtime observation to carry no name, no
// result and an N of at least 1. It returns the stats.
func requireObservedStats(t *testing.T, rec *recorder, h *Hub) HubStats {
	t.Helper()
	require.Eventually(t, func() bool { return observedStats(rec) == statsOf(h) }, rtWait, 10*time.Millisecond,
		"observed %+v, stats %+v\n%s", observedStats(rec), statsOf(h), rec.dump())
	st := statsOf(h)
	require.Equal(t, st, observedStats(rec), rec.dump())
	for _, k := range realtimeKinds {
		for _, o := range rec.of(k) {
			require.Empty(t, o.Name, "%v: channels are not attribute values", k)
			require.Equal(t, ResultNone, o.Result, "%v", k)
			require.Equal(t, PathNone, o.Path, "%v", k)
			require.GreaterOrEqual(t, o.N, int64(1), "%v", k)
		}
	}
	return st
}

// TestObserveRealtimeStreams: opens and closes balance on every way a
// stream ends (the client leaving, Disconnect, Shutdown), a refused stream
// is neither, and publishes and deliveries are counted per instance, a
// fan-out as one observation.
func TestObserveRealtimeStreams(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hubA, recA := observedHub(t, r, func(cfg *HubConfig) { cfg.MaxConnections = 4 })
		hubB, recB := observedHub(t, r, nil)
		appA, appB := newRTApp(t, hubA, nil, nil), newRTApp(t, hubB, nil, nil)
		const room = "obs-room"

		var onA []*sseStream
		for range 3 {
			onA = append(onA, openSSE(t, appA.events([]string{room}), nil))
		}
		onB := openSSE(t, appB.events([]string{room}), nil)
		require.EqualValues(t, 3, requireObservedStats(t, recA, hubA).Connections)
		require.EqualValues(t, 3, recA.count(ObsStreamOpen, ResultNone))
		require.Zero(t, recA.count(ObsStreamClose, ResultNone))
		require.EqualValues(t, 1, requireObservedStats(t, recB, hubB).Connections)

		// k events published on B reach the 3 streams of A and the one of
		// B: the publishes are B's, the deliveries each instance's own.
		const k = 5
		want := publishSeq(t, hubB, room, "e", 1, k)
		for _, s := range append(onA, onB) {
			require.Equal(t, want, s.Data(t, k))
		}
		stA, stB := requireObservedStats(t, recA, hubA), requireObservedStats(t, recB, hubB)
		require.EqualValues(t, k, recB.count(ObsPublish, ResultNone))
		require.Zero(t, recA.count(ObsPublish, ResultNone))
		require.EqualValues(t, 3*k, stA.Delivered)
		require.EqualValues(t, k, stB.Delivered)
		require.Less(t, len(recA.of(ObsDeliver)), 3*k, "a fan-out to several streams is one observation:\n%s", recA.dump())
		for _, o := range recA.of(ObsDeliver) {
			require.LessOrEqual(t, o.N, int64(3), "at most one per stream of the channel")
		}

		// Publishes on A count on A.
		want = publishSeq(t, hubA, room, "f", 1, 2)
		for _, s := range append(onA, onB) {
			require.Equal(t, want, s.Data(t, 2))
		}
		stA = requireObservedStats(t, recA, hubA)
		require.EqualValues(t, 2, stA.Published)
		require.EqualValues(t, 3*k+6, stA.Delivered)
		requireObservedStats(t, recB, hubB)

		// A user's stream fills the hub; one more is refused, and is
		// neither an open nor a close.
		bob := openSSE(t, appA.events([]string{room}), header("X-User", "bob"))
		require.EqualValues(t, 4, requireObservedStats(t, recA, hubA).Connections)
		errorJSON(t, appA.events([]string{room}), nil, http.StatusServiceUnavailable)
		require.EqualValues(t, 4, recA.count(ObsStreamOpen, ResultNone))
		require.Zero(t, recA.count(ObsStreamClose, ResultNone))

		// The clients leave, one at a time.
		for i, s := range onA[:2] {
			s.Close()
			eventually(t, func() bool { return hubA.Stats().Connections == int64(3-i) }, "stream %d ended", i)
			requireObservedStats(t, recA, hubA)
			require.EqualValues(t, i+1, recA.count(ObsStreamClose, ResultNone))
		}

		// Disconnect ends bob's stream (its internal publish counts as a
		// publish, as in HubStats, and delivers nothing).
		delivered := hubA.Stats().Delivered
		require.NoError(t, hubA.Disconnect(ctx5s(t), "bob"))
		requireDisconnected(t, bob, "disconnected")
		eventually(t, func() bool { return hubA.Stats().Connections == 1 }, "bob's stream ended")
		stA = requireObservedStats(t, recA, hubA)
		require.EqualValues(t, 3, stA.Published)
		require.Equal(t, delivered, stA.Delivered)
		require.EqualValues(t, 3, recA.count(ObsStreamClose, ResultNone))

		// Shutdown ends the rest: the gauge is back to 0.
		require.NoError(t, hubA.Shutdown(ctx5s(t)))
		requireDisconnected(t, onA[2], "shutdown")
		stA = requireObservedStats(t, recA, hubA)
		require.Zero(t, stA.Connections)
		require.EqualValues(t, 4, recA.count(ObsStreamOpen, ResultNone))
		require.EqualValues(t, 4, recA.count(ObsStreamClose, ResultNone))
		require.Zero(t, recA.count(ObsDropSlow, ResultNone)+recA.count(ObsResume, ResultNone)+recA.count(ObsReset, ResultNone))

		onB.Close()
		eventually(t, func() bool { return hubB.Stats().Connections == 0 }, "B's stream ended")
		require.Zero(t, requireObservedStats(t, recB, hubB).Connections)
	})
}

// TestObserveRealtimeResumeAndReset: a stream that resumes is one
// ObsResume and its replayed events are deliveries; a position whose
// history is gone is a reset.
func TestObserveRealtimeResumeAndReset(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub, rec := observedHub(t, r, nil)
		pub := newTestHub(t, r, r.Client(), nil)
		app := newRTApp(t, hub, nil, nil)
		const ch = "obs-resume"

		s := openSSE(t, app.events([]string{ch}), nil)
		publishSeq(t, pub, ch, "e", 1, 3)
		require.Equal(t, seq("e", 1, 3), s.Data(t, 3))
		at3 := s.LastID()
		s.Close()
		eventually(t, func() bool { return hub.Stats().Connections == 0 }, "the stream ended")
		st := requireObservedStats(t, rec, hub)
		require.Zero(t, st.Resumes)
		require.EqualValues(t, 3, st.Delivered)
		require.Zero(t, st.Published, "the publishes were another instance's")

		// Missed while away: replayed, and counted as delivered.
		publishSeq(t, pub, ch, "e", 4, 6)
		s, start := app.open(t, app.events([]string{ch}), header("Last-Event-ID", at3))
		require.True(t, start.Resumed)
		require.Equal(t, seq("e", 4, 6), s.Data(t, 3))
		st = requireObservedStats(t, rec, hub)
		require.EqualValues(t, 1, st.Resumes)
		require.EqualValues(t, 1, rec.count(ObsResume, ResultNone))
		require.EqualValues(t, 6, st.Delivered)
		require.Zero(t, st.Resets)
		stale := s.LastID()
		s.Close()

		// A stream without a position is no resume.
		s = openSSE(t, app.events([]string{ch}), nil)
		s.Close()
		eventually(t, func() bool { return hub.Stats().Connections == 0 }, "the streams ended")
		require.EqualValues(t, 1, requireObservedStats(t, rec, hub).Resumes)

		// The history is lost: the stale position gets a reset event (and
		// is still a resume: the position named the channel).
		r.deleteKeys()
		fresh := publish(t, pub, ch, "", "lost")
		require.EqualValues(t, 1, fresh.Offset)
		s = openSSE(t, app.events([]string{ch}), header("Last-Event-ID", stale))
		requireReset(t, s, ch)
		publish(t, pub, ch, "", "live")
		require.Equal(t, "live", s.Next(t).Data)
		st = requireObservedStats(t, rec, hub)
		require.EqualValues(t, 1, st.Resets)
		require.EqualValues(t, 1, rec.count(ObsReset, ResultNone))
		require.EqualValues(t, 2, st.Resumes)
		s.Close()
		eventually(t, func() bool { return hub.Stats().Connections == 0 }, "the stream ended")
		st = requireObservedStats(t, rec, hub)
		require.Zero(t, st.Connections)
		require.Equal(t, rec.count(ObsStreamOpen, ResultNone), rec.count(ObsStreamClose, ResultNone))
	})
}

// TestObserveRealtimeSlowClientDropped: a client that stops reading is one
// ObsDropSlow and its stream's close; the client that reads is untouched.
func TestObserveRealtimeSlowClientDropped(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hub, rec := observedHub(t, r, func(cfg *HubConfig) {
			cfg.MaxLen = 20
			cfg.ClientQueueEvents = 32
			cfg.ClientQueueBytes = 512 << 10
		})
		pub := newTestHub(t, r, r.Client(), func(cfg *HubConfig) { cfg.MaxLen = 20 })
		app := newRTApp(t, hub, nil, nil)
		const ch = "obs-slow"

		slow := openStuck(t, app, ch)
		normal := openSSE(t, app.events([]string{ch}), nil)
		eventually(t, func() bool { return hub.Stats().Connections == 2 }, "both streams are open")
		require.EqualValues(t, 2, requireObservedStats(t, rec, hub).Connections)

		payload := strings.Repeat("x", 60_000)
		sent := 0
		for sent < 600 && hub.Stats().DroppedSlow == 0 {
			sent++
			d := fmt.Sprintf("%d %s", sent, payload)
			publish(t, pub, ch, "big", d)
			require.Equal(t, d, normal.Next(t).Data, "event %d reached the normal client", sent)
		}
		eventually(t, func() bool { return hub.Stats().Connections == 1 && app.Active.Load() == 1 }, "the slow client's handler ended")
		st := requireObservedStats(t, rec, hub)
		require.EqualValues(t, 1, st.DroppedSlow, "dropped after %d events", sent)
		require.Len(t, rec.of(ObsDropSlow), 1)
		require.EqualValues(t, 1, rec.count(ObsStreamClose, ResultNone))
		require.GreaterOrEqual(t, st.Delivered, uint64(sent), "the normal client's events at least")

		// The server closed the slow connection.
		require.NoError(t, slow.SetReadDeadline(time.Now().Add(rtWait)))
		_, err := io.Copy(io.Discard, slow)
		require.NoError(t, err, "the server closed the slow client's connection")

		normal.Close()
		eventually(t, func() bool { return hub.Stats().Connections == 0 }, "the stream ended")
		require.Zero(t, requireObservedStats(t, rec, hub).Connections)
	})
}

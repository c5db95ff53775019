package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestMain lets the test binary act as the realtime benchmark's child
// processes: the harness re-executes os.Executable() with a subcommand.
func TestMain(m *testing.M) {
	if runSubcommand(os.Args[1:]) {
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestPayload: every payload is payloadSize bytes of JSON, and the load
// tool reads back its timestamp and measured flag.
func TestPayload(t *testing.T) {
	for _, tc := range []struct {
		ts       int64
		measured bool
		seq      uint64
	}{
		{1764640000123456789, true, 0},
		{1764640000123456789, false, 18446744073709551615},
		{1, true, 42},
	} {
		p := appendPayload(nil, tc.ts, tc.measured, tc.seq)
		if len(p) != payloadSize {
			t.Fatalf("payload %s: %d bytes, want %d", p, len(p), payloadSize)
		}
		ts, m, ok := parsePayload(append([]byte(" "), p...)) // after "data:"
		if !ok || ts != tc.ts || m != tc.measured {
			t.Fatalf("parsePayload(%s) = %d, %v, %v", p, ts, m, ok)
		}
	}
	for _, bad := range []string{"", "{}", `{"ts":}`, `{"ts":12`, `{"ts":12,"m":`, `{"seq":1,"ts":12,"m":1}`} {
		if _, _, ok := parsePayload([]byte(bad)); ok {
			t.Fatalf("parsePayload(%q) accepted", bad)
		}
	}
}

// TestHistogram: percentiles land in the right bucket (within its 1.6 %
// width) and max is exact; a report with reset clears it.
func TestHistogram(t *testing.T) {
	var h histogram
	for i := 1; i <= 1000; i++ {
		h.record(int64(i) * int64(time.Millisecond) / 100) // 10 µs … 10 ms
	}
	r := h.report(true)
	within := func(got, want float64) bool { return got >= want*0.98 && got <= want*1.02 }
	if r.Count != 1000 || !within(r.P50, 5000) || !within(r.P99, 9900) || r.Max != 10000 {
		t.Fatalf("report = %+v, want count 1000, p50 ≈ 5000 µs, p99 ≈ 9900 µs, max 10000 µs", r)
	}
	if r := h.report(false); r.Count != 0 || r.Max != 0 {
		t.Fatalf("after reset: %+v", r)
	}
	for us := uint64(0); us < 1<<36; us = us*3/2 + 1 {
		if mid := bucketMid(bucketOf(us)); mid < float64(us)*0.98 || mid > float64(us)*1.02+1 {
			t.Fatalf("bucketMid(bucketOf(%d)) = %v", us, mid)
		}
	}
}

// TestSSEClient: the load tool's SSE client against a real net/http
// stream (chunked): it goes live on ": connected", counts chat:message
// payloads, skips other events and comments, and counts the stream's end
// as a disconnect.
func TestSSEClient(t *testing.T) {
	now := time.Now().UnixNano()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("channels") != "room-1" {
			http.Error(w, `{"error":"bad channels"}`, http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "retry: 3000\n: connected\n\n")
		w.(http.Flusher).Flush()
		fmt.Fprintf(w, "event: chat:message\nid: 1.abc\ndata: %s\n\n", appendPayload(nil, now, true, 1))
		fmt.Fprint(w, ": hb\n\n")
		fmt.Fprint(w, "event: reset\nid: 1.abd\ndata: {\"channels\":[\"room-1\"]}\n\n")
		fmt.Fprintf(w, "event: chat:message\nid: 1.abe\ndata: %s\n\n", appendPayload(nil, now, false, 2))
		fmt.Fprint(w, "event: disconnect\nid: 1.abe\ndata: {\"reason\":\"shutdown\"}\n\n")
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")

	lt := &loadTool{}
	if _, err := lt.dialSSE(context.Background(), addr, "nope"); err == nil || !strings.Contains(err.Error(), "400") {
		t.Fatalf("dialSSE to a 400: %v", err)
	}
	if err := lt.connect(connectArgs{Kind: "sse", Servers: []string{addr}, Channels: []string{"room-1"}, PerChannel: 2}); err != nil {
		t.Fatal(err)
	}
	lt.wg.Wait() // the server ends both streams
	m := lt.mark()
	if m.Events != 4 || m.Measured != 2 || m.BadEvents != 0 || m.Disconnects != 2 {
		t.Fatalf("mark = %+v, want 4 events, 2 measured, 0 bad, 2 disconnects", m)
	}
	if r := lt.hist.report(true); r.Count != 2 {
		t.Fatalf("latency = %+v", r)
	}
	lt.closeAll()
}

// TestReadSSELongLine: a line longer than the reader's buffer is one bad
// event, and parsing goes on after it.
func TestReadSSELongLine(t *testing.T) {
	var in bytes.Buffer
	fmt.Fprintf(&in, "event: chat:message\ndata: %s\n\n", strings.Repeat("x", 10000))
	fmt.Fprintf(&in, "event: chat:message\ndata: %s\n\n", appendPayload(nil, time.Now().UnixNano(), true, 1))
	lt := &loadTool{}
	lt.readSSE(bufio.NewReaderSize(&in, 4096))
	if m := lt.mark(); m.BadEvents != 1 || m.Measured != 1 {
		t.Fatalf("mark = %+v, want 1 bad, 1 measured", m)
	}
}

// TestRealtimeSmoke runs the tiny plan end to end: Redis, two servers and
// a publisher per system, the load tool, every case and the memory case,
// in their own processes. It checks that the tables come out with a row
// per case and system and that no row has errors (nothing lost, nobody
// dropped); the figures themselves mean nothing at this size.
func TestRealtimeSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts redis-server and seven processes")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out bytes.Buffer
	broken, err := runRealtime(ctx, rtOptions{plan: tinyPlan, cases: regexp.MustCompile(""), systems: []string{"redisecho", "centrifuge"}}, &out)
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + out.String())
	if broken != 0 {
		t.Fatalf("%d rows with errors", broken)
	}
	for _, row := range []string{
		"| rooms 3×2 @ 50/s | redisecho (SSE, raw HTTP/1.1) | 50 | 100 |",
		"| rooms 3×2 @ 50/s | centrifuge (WebSocket, centrifuge-go) | 50 | 100 |",
		"| big room 1×10 @ 50/s | redisecho (SSE, raw HTTP/1.1) | 50 | 500 |",
		"| ceiling, rooms 3×2 (p99 ≤ 50 ms) | centrifuge (WebSocket, centrifuge-go) |",
		"| redisecho (Hub + SSEWithConfig) |",
		"| bare Echo SSE handler |",
		"**Not the method**",
	} {
		if !strings.Contains(out.String(), row) {
			t.Fatalf("no %q in the report", row)
		}
	}
}

func TestShortFunc(t *testing.T) {
	for in, want := range map[string]string{
		"net/http.(*conn).serve":                                    "net/http.(*conn).serve",
		"github.com/redisecho/redisecho.(*Hub).Serve":               "redisecho.(*Hub).Serve",
		"github.com/labstack/echo/v4.(*context).QueryParam":         "echo/v4.(*context).QueryParam",
		"github.com/redis/rueidis.(*pipe)._backgroundRead":          "rueidis.(*pipe)._backgroundRead",
		"main.newBareServer.func1":                                  "main.newBareServer.func1",
		"github.com/centrifugal/centrifuge.(*Client).handleCommand": "centrifuge.(*Client).handleCommand",
	} {
		if got := shortFunc(in); got != want {
			t.Errorf("shortFunc(%q) = %q, want %q", in, got, want)
		}
	}
}

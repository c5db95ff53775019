package main

// rt-load: the load tool. It holds every subscriber of a run, SSE streams
// (raw HTTP/1.1 over one TCP connection each, the event stream parsed in
// place: no allocation per event) or centrifuge-go clients (WebSocket, JSON
// protocol), and measures publish→receive latency from the send timestamp
// the publisher puts in each payload.
//
// Requests: "connect" (open subscribers, wait until every one is live),
// "mark" (this process's CPU time and event counters), "latency" (the
// histogram of measured events; reset), "close" (end every subscriber).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/bits"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	cfgo "github.com/centrifugal/centrifuge-go"
)

// connectArgs opens PerChannel subscribers on each of Channels; subscriber
// k (channel i, k = i*PerChannel+j) goes to Servers[k%len(Servers)], so a
// room's subscribers are split over the servers.
type connectArgs struct {
	Kind        string   `json:"kind"` // "sse" or "centrifuge"
	Servers     []string `json:"servers"`
	Channels    []string `json:"channels"`
	PerChannel  int      `json:"perChannel"`
	Concurrency int      `json:"concurrency"` // dials in flight; default 64
}

// loadMark is the reply to "mark".
type loadMark struct {
	CPUNanos    int64  `json:"cpuNanos"` // user + system time of this process
	Events      uint64 `json:"events"`   // payload events received, measured or not
	Measured    uint64 `json:"measured"` // events of the measured window
	Disconnects uint64 `json:"disconnects"`
	BadEvents   uint64 `json:"badEvents"` // payloads without a timestamp
	Retries     uint64 `json:"retries"`   // SSE connects answered 503 and tried again
	LastNano    int64  `json:"lastNano"`  // when the last measured event arrived (unix ns)
	Conns       int    `json:"conns"`
}

// latencyReport is the reply to "latency", in microseconds.
type latencyReport struct {
	Count uint64  `json:"count"`
	P50   float64 `json:"p50"`
	P99   float64 `json:"p99"`
	Max   float64 `json:"max"`
}

// loadTool is the state of the rt-load process.
type loadTool struct {
	hist        histogram
	events      atomic.Uint64
	measured    atomic.Uint64
	disconnects atomic.Uint64
	badEvents   atomic.Uint64
	retries     atomic.Uint64 // SSE connects answered 503 and tried again
	lastNano    atomic.Int64  // when the last measured event arrived (unix ns)

	mu     sync.Mutex
	closes []func()
	wg     sync.WaitGroup
}

func loadMain(args []string) error {
	fs := flag.NewFlagSet("rt-load", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := raiseFileLimit(); err != nil {
		return fmt.Errorf("RLIMIT_NOFILE: %w", err)
	}
	lt := &loadTool{}
	defer lt.closeAll()
	return serveRequests(struct{ Pid int }{os.Getpid()}, func(op string, raw json.RawMessage) (any, error) {
		switch op {
		case "connect":
			var a connectArgs
			if err := decodeArgs(raw, &a); err != nil {
				return nil, err
			}
			start := time.Now()
			if err := lt.connect(a); err != nil {
				return nil, err
			}
			return struct{ Seconds float64 }{time.Since(start).Seconds()}, nil
		case "mark":
			return lt.mark(), nil
		case "latency":
			return lt.hist.report(true), nil
		case "close":
			lt.closeAll()
			return nil, nil
		}
		return nil, fmt.Errorf("unknown op %q", op)
	})
}

func (lt *loadTool) mark() loadMark {
	lt.mu.Lock()
	n := len(lt.closes)
	lt.mu.Unlock()
	return loadMark{
		CPUNanos:    processCPU(),
		Events:      lt.events.Load(),
		Measured:    lt.measured.Load(),
		Disconnects: lt.disconnects.Load(),
		BadEvents:   lt.badEvents.Load(),
		Retries:     lt.retries.Load(),
		LastNano:    lt.lastNano.Load(),
		Conns:       n,
	}
}

func (lt *loadTool) closeAll() {
	lt.mu.Lock()
	closes := lt.closes
	lt.closes = nil
	lt.mu.Unlock()
	for _, c := range closes {
		c()
	}
	lt.wg.Wait()
}

// connect opens every subscriber and returns once each is live (the SSE
// stream sent its ": connected" comment, the centrifuge subscription is
// subscribed), or the first error.
func (lt *loadTool) connect(a connectArgs) error {
	if len(a.Servers) == 0 || len(a.Channels) == 0 || a.PerChannel < 1 {
		return errors.New("connect: servers, channels and perChannel are required")
	}
	if a.Concurrency <= 0 {
		a.Concurrency = 64
	}
	var dial func(ctx context.Context, addr, channel string) (func(), error)
	switch a.Kind {
	case "sse":
		dial = lt.dialSSERetry
	case "centrifuge":
		dial = lt.dialCentrifuge
	default:
		return fmt.Errorf("connect: unknown kind %q", a.Kind)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sem := make(chan struct{}, a.Concurrency)
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	k := 0
dials:
	for _, ch := range a.Channels {
		for j := 0; j < a.PerChannel; j++ {
			addr := a.Servers[k%len(a.Servers)]
			k++
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				break dials
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				stop, err := dial(ctx, addr, ch)
				if err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("subscribe %s on %s: %w", ch, addr, err); cancel() })
					return
				}
				lt.mu.Lock()
				lt.closes = append(lt.closes, stop)
				lt.mu.Unlock()
			}()
		}
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

// errUnavailable is a 503 answer to a stream request.
var errUnavailable = errors.New("503")

// dialSSERetry is dialSSE that tries again after a 503 (the hub refuses a
// stream whose channels Redis did not confirm in time), with backoff, as
// the example page does: up to 8 times.
func (lt *loadTool) dialSSERetry(ctx context.Context, addr, channel string) (func(), error) {
	backoff := 50 * time.Millisecond
	for try := 1; ; try++ {
		stop, err := lt.dialSSE(ctx, addr, channel)
		if !errors.Is(err, errUnavailable) || try == 8 {
			return stop, err
		}
		lt.retries.Add(1)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		backoff = min(2*backoff, time.Second)
	}
}

// dialSSE opens GET /events?channels=<channel> over HTTP/1.1 and waits for
// the stream's first comment; a goroutine then reads the stream until it
// is closed.
func (lt *loadTool) dialSSE(ctx context.Context, addr, channel string) (func(), error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	req := "GET /events?channels=" + channel + " HTTP/1.1\r\nHost: " + addr + "\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		conn.Close()
		return nil, err
	}
	br := bufio.NewReaderSize(conn, 4096)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		conn.Close()
		err := fmt.Errorf("%s %s: %s", resp.Status, resp.Header.Get("Content-Type"), bytes.TrimSpace(b))
		if resp.StatusCode == http.StatusServiceUnavailable {
			err = fmt.Errorf("%w: %w", errUnavailable, err)
		}
		return nil, err
	}
	// resp.Body undoes the chunked transfer coding; lines are read in place.
	lines := bufio.NewReaderSize(resp.Body, 4096)
	for {
		line, err := lines.ReadSlice('\n')
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("before ': connected': %w", err)
		}
		if bytes.HasPrefix(line, []byte(": connected")) {
			break
		}
	}
	_ = conn.SetDeadline(time.Time{})
	var closing atomic.Bool
	lt.wg.Add(1)
	go func() {
		defer lt.wg.Done()
		lt.readSSE(lines)
		if !closing.Load() {
			lt.disconnects.Add(1)
		}
	}()
	return func() { closing.Store(true); conn.Close() }, nil
}

var (
	sseData  = []byte("data:")
	sseEvent = []byte("event:")
	sseName  = []byte("chat:message")
)

// readSSE parses the stream until it fails: the data line of each
// chat:message event is one payload.
func (lt *loadTool) readSSE(lines *bufio.Reader) {
	skip := false // the current event is not a payload (reset, disconnect)
	for {
		line, err := lines.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			lt.badEvents.Add(1)
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = lines.ReadSlice('\n')
			}
			continue
		}
		if err != nil {
			return
		}
		switch {
		case len(line) <= 2 && (line[0] == '\n' || line[0] == '\r'):
			skip = false
		case bytes.HasPrefix(line, sseEvent):
			skip = !bytes.Equal(bytes.TrimSpace(line[len(sseEvent):]), sseName)
		case bytes.HasPrefix(line, sseData) && !skip:
			lt.receive(line[len(sseData):])
		}
	}
}

// dialCentrifuge connects one centrifuge-go client (its own WebSocket) and
// subscribes it to channel with recovery on.
func (lt *loadTool) dialCentrifuge(ctx context.Context, addr, channel string) (func(), error) {
	c := cfgo.NewJsonClient("ws://"+addr+"/connection/websocket", cfgo.Config{})
	sub, err := c.NewSubscription(channel, cfgo.SubscriptionConfig{Recoverable: true})
	if err != nil {
		c.Close()
		return nil, err
	}
	live := make(chan struct{})
	var once sync.Once
	var closing atomic.Bool
	sub.OnPublication(func(e cfgo.PublicationEvent) { lt.receive(e.Data) })
	sub.OnSubscribed(func(cfgo.SubscribedEvent) { once.Do(func() { close(live) }) })
	c.OnDisconnected(func(cfgo.DisconnectedEvent) {
		if !closing.Load() {
			lt.disconnects.Add(1)
		}
	})
	if err := c.Connect(); err != nil {
		c.Close()
		return nil, err
	}
	if err := sub.Subscribe(); err != nil {
		c.Close()
		return nil, err
	}
	select {
	case <-live:
	case <-ctx.Done():
		c.Close()
		return nil, ctx.Err()
	}
	return func() { closing.Store(true); c.Close() }, nil
}

// receive records one payload: {"ts":<unix ns>,"m":<0|1>,...}.
func (lt *loadTool) receive(data []byte) {
	now := time.Now().UnixNano()
	ts, measured, ok := parsePayload(data)
	if !ok {
		lt.badEvents.Add(1)
		return
	}
	lt.events.Add(1)
	if measured {
		lt.measured.Add(1)
		lt.hist.record(now - ts)
		lt.lastNano.Store(now)
	}
}

// parsePayload reads the timestamp and the measured flag of a payload
// written by appendPayload, without allocating.
func parsePayload(data []byte) (ts int64, measured bool, ok bool) {
	data = bytes.TrimLeft(data, " ")
	const tsKey, mKey = `{"ts":`, `,"m":`
	if !bytes.HasPrefix(data, []byte(tsKey)) {
		return 0, false, false
	}
	i := len(tsKey)
	for ; i < len(data) && data[i] >= '0' && data[i] <= '9'; i++ {
		ts = ts*10 + int64(data[i]-'0')
	}
	if i == len(tsKey) || !bytes.HasPrefix(data[i:], []byte(mKey)) || i+len(mKey) >= len(data) {
		return 0, false, false
	}
	return ts, data[i+len(mKey)] == '1', true
}

// histogram is a concurrent log-linear latency histogram in microseconds:
// exact below 128 µs, then 64 buckets per power of two (error < 1.6 %).
type histogram struct {
	buckets [128 + 40*64]atomic.Uint64
	count   atomic.Uint64
	max     atomic.Int64
}

func bucketOf(us uint64) int {
	if us < 128 {
		return int(us)
	}
	s := bits.Len64(us) - 7 // >= 1
	m := us >> s            // in [64, 128)
	i := 128 + (s-1)*64 + int(m-64)
	if i >= 128+40*64 {
		i = 128 + 40*64 - 1
	}
	return i
}

// bucketMid is the middle of bucket i's range, in microseconds.
func bucketMid(i int) float64 {
	if i < 128 {
		return float64(i)
	}
	s := (i-128)/64 + 1
	m := uint64((i-128)%64 + 64)
	return float64(m<<s) + float64(uint64(1)<<s)/2
}

func (h *histogram) record(ns int64) {
	if ns < 0 {
		ns = 0
	}
	h.buckets[bucketOf(uint64(ns/1000))].Add(1)
	h.count.Add(1)
	for {
		m := h.max.Load()
		if ns <= m || h.max.CompareAndSwap(m, ns) {
			break
		}
	}
}

// report computes the percentiles and, with reset, clears the histogram.
func (h *histogram) report(reset bool) latencyReport {
	var counts [len(h.buckets)]uint64
	var total uint64
	for i := range h.buckets {
		if reset {
			counts[i] = h.buckets[i].Swap(0)
		} else {
			counts[i] = h.buckets[i].Load()
		}
		total += counts[i]
	}
	r := latencyReport{Count: total, Max: float64(h.max.Load()) / 1000}
	if reset {
		h.count.Store(0)
		h.max.Store(0)
	}
	if total == 0 {
		return r
	}
	r.P50 = percentile(counts[:], total, 0.50)
	r.P99 = percentile(counts[:], total, 0.99)
	if r.P99 > r.Max {
		r.P99 = r.Max
	}
	if r.P50 > r.Max {
		r.P50 = r.Max
	}
	return r
}

func percentile(counts []uint64, total uint64, q float64) float64 {
	rank := uint64(q*float64(total) + 0.5)
	if rank < 1 {
		rank = 1
	}
	var cum uint64
	for i, c := range counts {
		cum += c
		if cum >= rank {
			return bucketMid(i)
		}
	}
	return bucketMid(len(counts) - 1)
}

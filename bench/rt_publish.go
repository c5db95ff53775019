package main

// rt-publish: the publisher process. It publishes at a fixed rate, round
// robin over a run's channels, through the system under test's own publish
// call (redisecho: Hub.Publish; centrifuge: Node.Publish with history),
// each payload carrying its send time.
//
// Requests: "run" (publish for Warmup + Duration seconds; the events of the
// second part are marked measured).

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// payloadSize is the size of every published payload, in bytes.
const payloadSize = 150

// publishFunc publishes one payload to channel.
type publishFunc func(ctx context.Context, channel string, payload []byte) error

// publisherKinds builds each system's publisher; the returned func
// releases it.
var publisherKinds = map[string]func(serverConfig) (publishFunc, func(), error){}

// publishArgs is a "run" request.
type publishArgs struct {
	Channels []string `json:"channels"`
	Rate     float64  `json:"rate"`     // publishes per second
	Warmup   float64  `json:"warmup"`   // seconds, not measured
	Duration float64  `json:"duration"` // seconds, measured
	Workers  int      `json:"workers"`  // concurrent publish calls; default 128
}

// publishResult is the reply to "run".
type publishResult struct {
	Published uint64  `json:"published"` // successful publishes, warm-up included
	Measured  uint64  `json:"measured"`  // successful publishes of the measured window
	Errors    uint64  `json:"errors"`
	FirstErr  string  `json:"firstErr,omitempty"`
	Achieved  float64 `json:"achieved"` // measured publishes per second of the window as it really lasted
	// WindowStart is when the measured window began (unix ns).
	WindowStart int64 `json:"windowStart"`
}

func publishMain(args []string) error {
	fs := flag.NewFlagSet("rt-publish", flag.ContinueOnError)
	kind := fs.String("kind", "redisecho", "system: redisecho or centrifuge")
	redisAddr := fs.String("redis", "", "Redis address")
	prefix := fs.String("prefix", "bench:rt:", "key prefix")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := raiseFileLimit(); err != nil {
		return fmt.Errorf("RLIMIT_NOFILE: %w", err)
	}
	build := publisherKinds[*kind]
	if build == nil {
		return fmt.Errorf("unknown -kind %q", *kind)
	}
	publish, release, err := build(serverConfig{Redis: *redisAddr, Prefix: *prefix})
	if err != nil {
		return err
	}
	defer release()
	return serveRequests(struct{ Pid int }{os.Getpid()}, func(op string, raw json.RawMessage) (any, error) {
		if op != "run" {
			return nil, fmt.Errorf("unknown op %q", op)
		}
		var a publishArgs
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
		return runPublisher(publish, a)
	})
}

type publishJob struct {
	channel  string
	seq      uint64
	measured bool
}

// runPublisher paces publishes at a.Rate: job i is due at start + i/Rate;
// a worker stamps the payload just before its publish call, so the latency
// is publish call → receive.
func runPublisher(publish publishFunc, a publishArgs) (publishResult, error) {
	if len(a.Channels) == 0 || a.Rate <= 0 || a.Duration <= 0 || a.Warmup < 0 {
		return publishResult{}, errors.New("run: channels, rate > 0 and duration > 0 are required")
	}
	if a.Workers <= 0 {
		a.Workers = 128
	}
	var (
		res                  publishResult
		published, measured  atomic.Uint64
		failed               atomic.Uint64
		errMu                sync.Mutex
		lastMeasuredDoneNano atomic.Int64
	)
	jobs := make(chan publishJob, 1024)
	var wg sync.WaitGroup
	for w := 0; w < a.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				// A fresh buffer each time: a publish call may keep its data.
				payload := appendPayload(make([]byte, 0, payloadSize), time.Now().UnixNano(), j.measured, j.seq)
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				err := publish(ctx, j.channel, payload)
				cancel()
				if err != nil {
					failed.Add(1)
					errMu.Lock()
					if res.FirstErr == "" {
						res.FirstErr = err.Error()
					}
					errMu.Unlock()
					continue
				}
				published.Add(1)
				if j.measured {
					measured.Add(1)
					lastMeasuredDoneNano.Store(time.Now().UnixNano())
				}
			}
		}()
	}
	warm := uint64(a.Warmup * a.Rate)
	total := warm + uint64(a.Duration*a.Rate)
	interval := float64(time.Second) / a.Rate
	start := time.Now()
	var windowStart time.Time
	for i := uint64(0); i < total; i++ {
		due := start.Add(time.Duration(float64(i) * interval))
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		if i == warm {
			windowStart = time.Now()
		}
		jobs <- publishJob{channel: a.Channels[i%uint64(len(a.Channels))], seq: i, measured: i >= warm}
	}
	close(jobs)
	wg.Wait()
	res.Published, res.Measured, res.Errors = published.Load(), measured.Load(), failed.Load()
	if !windowStart.IsZero() {
		res.WindowStart = windowStart.UnixNano()
	}
	if last := lastMeasuredDoneNano.Load(); last > 0 && !windowStart.IsZero() {
		// The window as it really lasted: from its first due publish to the
		// last measured one done, at least its planned length.
		elapsed := max(time.Duration(last-windowStart.UnixNano()), time.Duration(a.Duration*float64(time.Second)))
		res.Achieved = float64(res.Measured) / elapsed.Seconds()
	}
	return res, nil
}

// appendPayload writes a payloadSize-byte JSON object:
// {"ts":<unix ns>,"m":<0|1>,"seq":<n>,"pad":"xxx…"}.
func appendPayload(b []byte, ts int64, measured bool, seq uint64) []byte {
	b = append(b, `{"ts":`...)
	b = strconv.AppendInt(b, ts, 10)
	if measured {
		b = append(b, `,"m":1`...)
	} else {
		b = append(b, `,"m":0`...)
	}
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, `,"pad":"`...)
	for len(b) < payloadSize-2 {
		b = append(b, 'x')
	}
	return append(b, `"}`...)
}

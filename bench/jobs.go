package main

// The queue benchmark (`go run . jobs`): redisecho's Queue and Worker
// against asynq v0.26 on the same Redis in the same run. Queue workloads do
// not fit wrk, so, as issue 12 asks:
//
//   - drain: pre-fill N no-op jobs, then time a worker (concurrency 10 and
//     50) processing all of them: jobs/s;
//   - enqueue: N jobs from 8 concurrent producers one at a time, and (for
//     redisecho) in batches of 100: jobs/s;
//   - pickup: on an idle queue, one job at a time, the time from the
//     enqueue call to the handler's start: p50 and p99 over 200 samples.
//
// Each case runs in each of two interleaved rounds (redisecho, asynq,
// redisecho, asynq), each on fresh queue names; the table reports the
// medians (with two rounds, their mean), the ratio to asynq, and the Redis
// commands per job (Δ of summed INFO commandstats calls over the measured
// part only / jobs).

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"runtime/pprof"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/rueidis"

	"github.com/redisecho/redisecho"
)

func init() { subcommands["jobs"] = jobsMain }

// jobsOpts are the queue benchmark's settings.
type jobsOpts struct {
	n, pickups, rounds int
	redis              string
	out                io.Writer
}

// jobRow is one measured case of one library in one round.
type jobRow struct {
	perSec  float64
	p50     time.Duration
	p99     time.Duration
	cmdsJob float64
	cpuJob  time.Duration // Redis server CPU per job
}

func jobsMain(args []string) error {
	fs := flag.NewFlagSet("jobs", flag.ContinueOnError)
	o := jobsOpts{out: os.Stdout}
	quick := fs.Bool("quick", false, "a tiny run (1,000 jobs, 20 pickups, one round): a smoke test, not a measurement")
	fs.IntVar(&o.n, "n", 20000, "jobs per drain and enqueue case")
	fs.IntVar(&o.pickups, "pickups", 200, "pickup latency samples")
	fs.IntVar(&o.rounds, "rounds", 2, "interleaved rounds")
	fs.StringVar(&o.redis, "redis", "", "address of an existing Redis (default: a throwaway redis-server)")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *quick {
		o.n, o.pickups, o.rounds = 1000, 20, 1
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	return runJobs(context.Background(), o)
}

// jobLib is one library under test.
type jobLib interface {
	name() string
	// enqueue adds n no-op jobs to queue from producers goroutines, one at
	// a time (batch 0) or in batches.
	enqueue(ctx context.Context, queue string, n, producers, batch int) error
	// work starts a worker on queue with concurrency c; handler runs for
	// each job; stop stops it.
	work(queue string, c int, handler func()) (stop func(), err error)
}

func runJobs(ctx context.Context, o jobsOpts) error {
	addr, kind, stop, err := useRedis(ctx, o.redis)
	if err != nil {
		return err
	}
	defer stop()
	rc, err := dialRedis(addr)
	if err != nil {
		return err
	}
	defer rc.Close()
	version, _ := rc.serverVersion()

	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		return err
	}
	defer client.Close()
	libs := []jobLib{&redisechoJobs{client: client}, &asynqJobs{opt: asynq.RedisClientOpt{Addr: addr}}}
	defer libs[1].(*asynqJobs).close()

	type caseDef struct {
		name string
		run  func(lib jobLib, queue string) (jobRow, error)
	}
	measure := func(fn func() error, jobs int) (jobRow, error) {
		before, err := rc.totalCalls()
		if err != nil {
			return jobRow{}, err
		}
		cpu0, err := rc.cpuSeconds()
		if err != nil {
			return jobRow{}, err
		}
		t0 := time.Now()
		if err := fn(); err != nil {
			return jobRow{}, err
		}
		d := time.Since(t0)
		cpu1, err := rc.cpuSeconds()
		if err != nil {
			return jobRow{}, err
		}
		after, err := rc.totalCalls()
		if err != nil {
			return jobRow{}, err
		}
		return jobRow{perSec: float64(jobs) / d.Seconds(), cmdsJob: float64(after-before-3) / float64(jobs),
			cpuJob: time.Duration((cpu1 - cpu0) / float64(jobs) * float64(time.Second))}, nil
	}
	drain := func(c int) func(lib jobLib, queue string) (jobRow, error) {
		return func(lib jobLib, queue string) (jobRow, error) {
			if err := lib.enqueue(ctx, queue, o.n, 8, 100); err != nil {
				return jobRow{}, err
			}
			var done atomic.Int64
			all := make(chan struct{})
			var stopWork func()
			row, err := measure(func() error {
				var err error
				stopWork, err = lib.work(queue, c, func() {
					if done.Add(1) == int64(o.n) {
						close(all)
					}
				})
				if err != nil {
					return err
				}
				select {
				case <-all:
					return nil
				case <-time.After(5 * time.Minute):
					return fmt.Errorf("%s: drained %d of %d jobs in 5 min", lib.name(), done.Load(), o.n)
				}
			}, o.n)
			if stopWork != nil {
				stopWork()
			}
			return row, err
		}
	}
	enqueue := func(batch int) func(lib jobLib, queue string) (jobRow, error) {
		return func(lib jobLib, queue string) (jobRow, error) {
			if batch > 0 {
				if _, ok := lib.(*asynqJobs); ok {
					return jobRow{}, errNotApplicable
				}
			}
			return measure(func() error { return lib.enqueue(ctx, queue, o.n, 8, batch) }, o.n)
		}
	}
	pickup := func(lib jobLib, queue string) (jobRow, error) {
		started := make(chan time.Time, 1)
		stopWork, err := lib.work(queue, 10, func() { started <- time.Now() })
		if err != nil {
			return jobRow{}, err
		}
		defer stopWork()
		time.Sleep(1500 * time.Millisecond) // idle: blocked (redisecho) or polling (asynq)
		lat := make([]time.Duration, 0, o.pickups)
		for range o.pickups {
			t0 := time.Now()
			if err := lib.enqueue(ctx, queue, 1, 1, 0); err != nil {
				return jobRow{}, err
			}
			select {
			case at := <-started:
				lat = append(lat, at.Sub(t0))
			case <-time.After(10 * time.Second):
				return jobRow{}, fmt.Errorf("%s: no pickup within 10 s", lib.name())
			}
			time.Sleep(time.Duration(5+len(lat)%7) * time.Millisecond) // let the worker go idle again
		}
		slices.Sort(lat)
		return jobRow{p50: lat[len(lat)/2], p99: lat[min(len(lat)-1, len(lat)*99/100)]}, nil
	}
	cases := []caseDef{
		{"drain, concurrency 10", drain(10)},
		{"drain, concurrency 50", drain(50)},
		{"enqueue one at a time (8 producers)", enqueue(0)},
		{"enqueue in batches of 100 (8 producers)", enqueue(100)},
		{"pickup latency, idle queue", pickup},
	}
	results := map[string]map[string][]jobRow{}
	seq := 0
	for round := range o.rounds {
		for _, c := range cases {
			for _, lib := range libs {
				seq++
				queue := fmt.Sprintf("bench%d", seq)
				row, err := c.run(lib, queue)
				if errors.Is(err, errNotApplicable) {
					continue
				}
				if err != nil {
					return fmt.Errorf("round %d, %s, %s: %w", round+1, c.name, lib.name(), err)
				}
				if results[c.name] == nil {
					results[c.name] = map[string][]jobRow{}
				}
				results[c.name][lib.name()] = append(results[c.name][lib.name()], row)
				fmt.Fprintf(os.Stderr, "round %d  %-42s %-10s %10.0f jobs/s  p50 %-10v p99 %-10v %5.2f cmds/job  Redis CPU %v/job\n",
					round+1, c.name, lib.name(), row.perSec, row.p50, row.p99, row.cmdsJob, row.cpuJob)
			}
		}
	}

	w := o.out
	fmt.Fprintf(w, "Queue benchmark (`go run . jobs`): %d jobs per case, %d pickups, %d interleaved round(s), medians (in brackets: the spread of the per-round ratios); Redis %s (%s), %s.\n\n",
		o.n, o.pickups, o.rounds, version, kind, time.Now().UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintln(w, "| case | redisecho | asynq v0.26 | redisecho / asynq | Redis cmds/job (redisecho, asynq) | Redis CPU/job (redisecho, asynq) |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|")
	for _, c := range cases {
		re, as := results[c.name]["redisecho"], results[c.name]["asynq"]
		cmds := func(rows []jobRow) string {
			if len(rows) == 0 {
				return "n/a"
			}
			return fmt.Sprintf("%.2f", jobMedian(rows, func(r jobRow) float64 { return r.cmdsJob }))
		}
		if c.name == "pickup latency, idle queue" {
			lat := func(rows []jobRow) string {
				if len(rows) == 0 {
					return "n/a"
				}
				p50 := jobMedian(rows, func(r jobRow) float64 { return float64(r.p50) })
				p99 := jobMedian(rows, func(r jobRow) float64 { return float64(r.p99) })
				return fmt.Sprintf("p50 %v, p99 %v", time.Duration(p50).Round(10*time.Microsecond), time.Duration(p99).Round(10*time.Microsecond))
			}
			ratio := "n/a"
			if len(re) > 0 && len(as) > 0 {
				ratio = fmt.Sprintf("%.0f× faster (p99)", jobMedian(as, func(r jobRow) float64 { return float64(r.p99) })/jobMedian(re, func(r jobRow) float64 { return float64(r.p99) }))
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s | – | – |\n", c.name, lat(re), lat(as), ratio)
			continue
		}
		rate := func(rows []jobRow) string {
			if len(rows) == 0 {
				return "n/a"
			}
			return fmt.Sprintf("%.0f/s", jobMedian(rows, func(r jobRow) float64 { return r.perSec }))
		}
		ratio := "n/a"
		if len(re) > 0 && len(as) > 0 {
			// The ratio of the medians, and the spread of the ratios of
			// each round's back-to-back pair.
			ratio = fmt.Sprintf("%.2f×", jobMedian(re, func(r jobRow) float64 { return r.perSec })/jobMedian(as, func(r jobRow) float64 { return r.perSec }))
			if len(re) == len(as) && len(re) > 1 {
				lo, hi := math.Inf(1), 0.0
				for i := range re {
					x := re[i].perSec / as[i].perSec
					lo, hi = min(lo, x), max(hi, x)
				}
				ratio += fmt.Sprintf(" (%.2f–%.2f)", lo, hi)
			}
		}
		cpu := func(rows []jobRow) string {
			if len(rows) == 0 {
				return "n/a"
			}
			return time.Duration(jobMedian(rows, func(r jobRow) float64 { return float64(r.cpuJob) })).Round(100 * time.Nanosecond).String()
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s, %s | %s, %s |\n", c.name, rate(re), rate(as), ratio, cmds(re), cmds(as), cpu(re), cpu(as))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "asynq runs with its defaults (its idle workers poll every TaskCheckInterval, 1 s); it has no batch enqueue. "+
		"redisecho runs with its defaults (lease 30 s) and an idle worker blocked in BZPOPMIN.")
	return nil
}

// errNotApplicable: the library has no such operation.
var errNotApplicable = errors.New("not applicable")

// jobMedian is the median of f over rows (the mean of the middle two for an even count).
func jobMedian(rows []jobRow, f func(jobRow) float64) float64 {
	v := make([]float64, len(rows))
	for i, r := range rows {
		v[i] = f(r)
	}
	sort.Float64s(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// spread splits n jobs over producers goroutines running fn(count).
func spread(n, producers int, fn func(count int) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, producers)
	for p := range producers {
		count := n / producers
		if p < n%producers {
			count++
		}
		if count == 0 {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(count); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// redisechoJobs is redisecho's Queue and Worker.
type redisechoJobs struct{ client rueidis.Client }

func (*redisechoJobs) name() string { return "redisecho" }

func (r *redisechoJobs) queue(name string) (*redisecho.Queue, error) {
	return redisecho.NewQueue(redisecho.QueueConfig{Client: r.client, Name: name, Options: redisecho.Options{Prefix: "bench:", Timeout: 5 * time.Second}})
}

func (r *redisechoJobs) enqueue(ctx context.Context, name string, n, producers, batch int) error {
	q, err := r.queue(name)
	if err != nil {
		return err
	}
	return spread(n, producers, func(count int) error {
		if batch == 0 {
			for range count {
				if _, err := q.Enqueue(ctx, "noop", nil); err != nil {
					return err
				}
			}
			return nil
		}
		for count > 0 {
			k := min(batch, count)
			jobs := make([]redisecho.BatchJob, k)
			for i := range jobs {
				jobs[i] = redisecho.BatchJob{Type: "noop"}
			}
			if _, err := q.EnqueueBatch(ctx, jobs); err != nil {
				return err
			}
			count -= k
		}
		return nil
	})
}

func (r *redisechoJobs) work(name string, c int, handler func()) (func(), error) {
	q, err := r.queue(name)
	if err != nil {
		return nil, err
	}
	w, err := redisecho.NewWorker(redisecho.WorkerConfig{
		Queues:  []redisecho.WorkerQueue{{Queue: q, Concurrency: c}},
		Handler: redisecho.JobHandlerFunc(func(context.Context, *redisecho.Job) (any, error) { handler(); return nil, nil }),
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		return nil, err
	}
	if err := w.Start(); err != nil {
		return nil, err
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = w.Shutdown(ctx)
	}, nil
}

// asynqJobs is asynq's Client and Server, with their defaults.
type asynqJobs struct {
	opt    asynq.RedisClientOpt
	once   sync.Once
	client *asynq.Client
}

func (*asynqJobs) name() string { return "asynq" }

func (a *asynqJobs) cli() *asynq.Client {
	a.once.Do(func() { a.client = asynq.NewClient(a.opt) })
	return a.client
}

func (a *asynqJobs) close() {
	if a.client != nil {
		_ = a.client.Close()
	}
}

func (a *asynqJobs) enqueue(ctx context.Context, name string, n, producers, _ int) error {
	c := a.cli()
	return spread(n, producers, func(count int) error {
		for range count {
			if _, err := c.EnqueueContext(ctx, asynq.NewTask("noop", nil), asynq.Queue(name), asynq.MaxRetry(2)); err != nil {
				return err
			}
		}
		return nil
	})
}

func (a *asynqJobs) work(name string, c int, handler func()) (func(), error) {
	srv := asynq.NewServer(a.opt, asynq.Config{
		Concurrency: c,
		Queues:      map[string]int{name: 1},
		LogLevel:    asynq.ErrorLevel,
		Logger:      quietAsynq{},
	})
	mux := asynq.NewServeMux()
	mux.HandleFunc("noop", func(context.Context, *asynq.Task) error { handler(); return nil })
	if err := srv.Start(mux); err != nil {
		return nil, err
	}
	return srv.Shutdown, nil
}

// quietAsynq drops asynq's logs.
type quietAsynq struct{}

func (quietAsynq) Debug(...any) {}
func (quietAsynq) Info(...any)  {}
func (quietAsynq) Warn(...any)  {}
func (quietAsynq) Error(...any) {}
func (quietAsynq) Fatal(args ...any) {
	fmt.Fprintln(os.Stderr, append([]any{"asynq:"}, args...)...)
	os.Exit(1)
}

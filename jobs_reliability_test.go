package redisecho

// The reliability test of the job queue (issue 12's headline): thousands of
// jobs run through worker processes (this test binary, re-executed) that are
// killed with SIGKILL at random moments and restarted, frozen with SIGSTOP
// past their lease and resumed, while the parent keeps enqueueing and kills
// every Redis connection now and then. At the end every job is completed
// exactly once in the queue, none is lost or stuck, every side effect ran
// at least once and more than once only for jobs whose attempt was cut.

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	ossignal "os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// jobChildEnv, when set, makes the test binary a job worker process
// (runJobChild) instead of running tests: its value is the JSON of a
// jobChildConfig.
const jobChildEnv = "REDISECHO_TEST_JOB_WORKER"

// jobChildConfig tells a worker process where to work.
type jobChildConfig struct {
	Addrs       []string      `json:"addrs"`
	Prefix      string        `json:"prefix"`
	Queue       string        `json:"queue"`
	Concurrency int           `json:"concurrency"`
	Lease       time.Duration `json:"lease"`
	StallLimit  int           `json:"stallLimit"`
	// Ledger is the hash the handler counts its side effects in: job ID →
	// number of times the handler's effect ran.
	Ledger string `json:"ledger"`
	// Stats is the hash a process reports its leases lost in, under its
	// PID.
	Stats string `json:"stats"`
}

// runJobChild is a worker process: it works the queue until killed, or
// until SIGTERM, when it shuts down gracefully. It returns the exit code.
func runJobChild(raw string) int {
	var cfg jobChildConfig
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "job worker:", err)
		return 2
	}
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: cfg.Addrs})
	if err != nil {
		fmt.Fprintln(os.Stderr, "job worker:", err)
		return 2
	}
	defer client.Close()
	q, err := NewQueue(QueueConfig{Client: client, Options: Options{Prefix: cfg.Prefix}, Name: cfg.Queue, KeepCompleted: 1 << 20, Backoff: FixedBackoff(10 * time.Millisecond)})
	if err != nil {
		fmt.Fprintln(os.Stderr, "job worker:", err)
		return 2
	}
	handler := JobHandlerFunc(func(ctx context.Context, job *Job) (any, error) {
		time.Sleep(time.Duration(5+rand.IntN(40)) * time.Millisecond) // ignores ctx on purpose: a late worker
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := client.Do(cctx, client.B().Hincrby().Key(cfg.Ledger).Field(job.ID).Increment(1).Build()).Error(); err != nil {
			return nil, err // the effect may or may not have run: the retry shows as a second count
		}
		return nil, nil
	})
	w, err := NewWorker(WorkerConfig{
		Queues:       []WorkerQueue{{Queue: q, Concurrency: cfg.Concurrency}},
		Handler:      handler,
		Lease:        cfg.Lease,
		ReapInterval: cfg.Lease / 4,
		StallLimit:   cfg.StallLimit,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "job worker:", err)
		return 2
	}
	if err := w.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "job worker:", err)
		return 2
	}
	term := make(chan os.Signal, 1)
	ossignal.Notify(term, syscall.SIGTERM)
	report := time.NewTicker(50 * time.Millisecond)
	defer report.Stop()
	pid := strconv.Itoa(os.Getpid())
	for {
		select {
		case <-term:
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = w.Shutdown(ctx)
			cancel()
			writeChildStats(client, cfg.Stats, pid, w.Stats())
			return 0
		case <-report.C:
			writeChildStats(client, cfg.Stats, pid, w.Stats())
		}
	}
}

func writeChildStats(client rueidis.Client, key, pid string, s JobStats) {
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_ = client.Do(ctx, client.B().Hset().Key(key).FieldValue().FieldValue(pid, strconv.FormatUint(s.LeasesLost, 10)).Build()).Error()
}

// workerProc is one running worker process.
type workerProc struct {
	cmd     *exec.Cmd
	done    chan struct{}
	started time.Time
}

// startWorkerProc re-executes the test binary as a worker process.
func startWorkerProc(t *testing.T, cfg jobChildConfig) *workerProc {
	t.Helper()
	raw, err := json.Marshal(cfg)
	require.NoError(t, err)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), jobChildEnv+"="+string(raw))
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	p := &workerProc{cmd: cmd, done: make(chan struct{}), started: time.Now()}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		<-p.done
	})
	return p
}

func (p *workerProc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGCONT)
	_ = p.cmd.Process.Kill()
	<-p.done
}

// TestJobsSurviveSIGKILL is the reliability test. Its size is bounded so
// that the suite stays fast; REDISECHO_TEST_JOBS_LONG=1 runs ten times as
// many jobs.
func TestJobsSurviveSIGKILL(t *testing.T) {
	n := 3000
	if os.Getenv("REDISECHO_TEST_JOBS_LONG") == "1" {
		n = 30000
	}
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		ctx := context.Background()
		cfg := jobChildConfig{
			Addrs:       f.addrs,
			Prefix:      f.Keys.Prefix(),
			Queue:       "reliable",
			Concurrency: 8,
			Lease:       time.Second,
			StallLimit:  1000, // above any number of kills a job can see
			Ledger:      f.Keys.Key("ledger"),
			Stats:       f.Keys.Key("stats"),
		}
		producer := f.Client()
		q, err := NewQueue(QueueConfig{Client: producer, Options: Options{Prefix: cfg.Prefix, Timeout: 2 * time.Second}, Name: cfg.Queue, KeepCompleted: 1 << 20})
		require.NoError(t, err)

		const procs = 3
		var mu sync.Mutex
		workers := make([]*workerProc, procs)
		for i := range workers {
			workers[i] = startWorkerProc(t, cfg)
		}

		// Producers: two goroutines with clients of their own, enqueueing
		// with caller-chosen IDs, retrying an enqueue whose reply was lost
		// (the same ID is one job).
		var enqueued atomic.Int64
		var wg sync.WaitGroup
		for p := range 2 {
			client := f.Client()
			pq, err := NewQueue(QueueConfig{Client: client, Options: Options{Prefix: cfg.Prefix, Timeout: 2 * time.Second}, Name: cfg.Queue, KeepCompleted: 1 << 20})
			require.NoError(t, err)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := p; i < n; i += 2 {
					id := "job-" + strconv.Itoa(i)
					for {
						if _, err := pq.Enqueue(ctx, "work", []byte(id), JobID(id), JobMaxAttempts(1000)); err == nil {
							break
						}
						time.Sleep(20 * time.Millisecond)
					}
					enqueued.Add(1)
					time.Sleep(4 * time.Millisecond) // keep enqueueing while the chaos runs

				}
			}()
		}

		// Chaos: SIGKILL a random worker and restart it; now and then kill
		// every connection; once, freeze a worker past its lease.
		stop := make(chan struct{})
		chaosDone := make(chan struct{})
		var kills, connKills int
		froze := false
		go func() {
			defer close(chaosDone)
			for round := 0; ; round++ {
				select {
				case <-stop:
					return
				case <-time.After(time.Duration(100+rand.IntN(200)) * time.Millisecond):
				}
				i := rand.IntN(procs)
				mu.Lock()
				oldest := 0
				for j, w := range workers {
					if w.started.Before(workers[oldest].started) {
						oldest = j
					}
				}
				switch {
				case round >= 2 && !froze && time.Since(workers[oldest].started) > time.Second:
					// (One up for a second holds jobs: one still booting
					// would hold none, and lose no lease.)
					i = oldest
					// Frozen for three leases: its jobs are reaped and
					// taken over; when it wakes, its completions must
					// be refused.
					froze = true
					p := workers[i].cmd.Process
					_ = p.Signal(syscall.SIGSTOP)
					mu.Unlock()
					time.Sleep(3 * cfg.Lease)
					_ = p.Signal(syscall.SIGCONT)
					continue
				case round%7 == 6:
					// As f.KillConnections, from this goroutine (which
					// must not fail the test).
					for _, s := range f.tp.Servers {
						_, _ = respDo(s.Addr(), time.Second, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
					}
					connKills++
				default:
					workers[i].kill()
					workers[i] = startWorkerProc(t, cfg)
					kills++
				}
				mu.Unlock()
			}
		}()

		wg.Wait()
		var counts JobCounts
		require.Eventually(t, func() bool {
			counts, err = q.Counts(ctx)
			return err == nil && counts.Completed == int64(n)
		}, 3*time.Minute, 100*time.Millisecond, "every job completes: last counts %+v (%v)", counts, err)
		close(stop)
		<-chaosDone
		t.Logf("%d jobs, %d worker kills, %d connection kills, a frozen worker", n, kills, connKills)

		// Every job is completed, none lost, none stuck.
		counts, err = q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, JobCounts{Completed: int64(n)}, counts)
		require.Equal(t, int64(n), enqueued.Load())

		// Exactly once in the queue's record, each job completed.
		doneKey := f.Keys.Group("jq", cfg.Queue).Key("done")
		done, err := producer.Do(ctx, producer.B().Zrange().Key(doneKey).Min("0").Max("-1").Build()).AsStrSlice()
		require.NoError(t, err)
		require.Len(t, done, n)
		seen := map[string]bool{}
		for _, id := range done {
			require.False(t, seen[id], "job %s completed twice", id)
			seen[id] = true
		}

		// Every side effect ran at least once; more than once only for jobs
		// with more than one attempt (one cut by a kill, a lost lease or
		// the frozen worker).
		ledger, err := producer.Do(ctx, producer.B().Hgetall().Key(cfg.Ledger).Build()).AsStrMap()
		require.NoError(t, err)
		var repeated int
		for i := range n {
			id := "job-" + strconv.Itoa(i)
			runs, _ := strconv.Atoi(ledger[id])
			require.GreaterOrEqual(t, runs, 1, "the side effect of %s never ran", id)
			info, err := q.Job(ctx, id)
			require.NoError(t, err)
			require.Equal(t, JobCompleted, info.State)
			if runs > 1 {
				repeated++
				require.Greater(t, info.Attempts, 1, "%s ran %d times in one attempt", id, runs)
			}
		}

		// The frozen worker woke up with jobs whose leases were gone: its
		// reports were refused (leases lost), and applied nowhere.
		stats, err := producer.Do(ctx, producer.B().Hgetall().Key(cfg.Stats).Build()).AsStrMap()
		require.NoError(t, err)
		var lost int
		for _, v := range stats {
			n, _ := strconv.Atoi(v)
			lost += n
		}
		// How many it held when frozen is up to the chaos (one that had just
		// been handed nothing holds none): the refusal itself is what the
		// exactly-once checks above prove, and TestFencing and
		// TestLeaseLostCancelsHandler test it directly.
		t.Logf("side effects repeated for %d jobs (attempts cut); %d leases lost (%v)", repeated, lost, stats)

		// Graceful shutdown of the survivors still works.
		mu.Lock()
		defer mu.Unlock()
		for _, w := range workers {
			_ = w.cmd.Process.Signal(syscall.SIGTERM)
		}
		for _, w := range workers {
			select {
			case <-w.done:
				require.True(t, w.cmd.ProcessState.Success() || strings.Contains(w.cmd.ProcessState.String(), "killed"), w.cmd.ProcessState.String())
			case <-time.After(10 * time.Second):
				t.Error("a worker did not stop on SIGTERM")
			}
		}
	})
}

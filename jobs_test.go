package redisecho

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// newTestQueue builds a queue named name on client under r's prefix.
func newTestQueue(t *testing.T, r *testRedis, client rueidis.Client, name string, mod ...func(*QueueConfig)) *Queue {
	t.Helper()
	cfg := QueueConfig{Client: client, Options: Options{Prefix: r.Keys.Prefix()}, Name: name}
	for _, m := range mod {
		m(&cfg)
	}
	q, err := NewQueue(cfg)
	require.NoError(t, err)
	return q
}

// startWorker starts a worker on qs with handler, shut down when the test
// ends.
func startWorker(t *testing.T, handler JobHandler, mod func(*WorkerConfig), qs ...*Queue) *Worker {
	t.Helper()
	cfg := WorkerConfig{Handler: handler, Lease: 2 * time.Second, ReapInterval: 200 * time.Millisecond}
	for _, q := range qs {
		cfg.Queues = append(cfg.Queues, WorkerQueue{Queue: q, Concurrency: 4})
	}
	if mod != nil {
		mod(&cfg)
	}
	w, err := NewWorker(cfg)
	require.NoError(t, err)
	require.NoError(t, w.Start())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = w.Shutdown(ctx)
	})
	return w
}

// waitState waits until job id is in state want.
func waitState(t *testing.T, q *Queue, id string, want JobState, within time.Duration) JobInfo {
	t.Helper()
	var info JobInfo
	var err error
	require.Eventually(t, func() bool {
		info, err = q.Job(context.Background(), id)
		return err == nil && info.State == want
	}, within, 5*time.Millisecond, "job %s never reached %s: %+v %v", id, want, info, err)
	return info
}

func TestQueueConfigDefaults(t *testing.T) {
	c := standaloneRedis
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: c.addrs})
	require.NoError(t, err)
	defer client.Close()
	q, err := NewQueue(QueueConfig{Client: client})
	require.NoError(t, err)
	require.Equal(t, DefaultQueueName, q.Name())
	require.Equal(t, DefaultMaxPayloadBytes, q.cfg.MaxPayloadBytes)
	require.Equal(t, DefaultMaxAttempts, q.cfg.MaxAttempts)
	require.Equal(t, DefaultBackoff, q.cfg.Backoff)
	for _, bad := range []string{"a b", "x{y}", strings.Repeat("a", 65), "é"} {
		_, err := NewQueue(QueueConfig{Client: client, Name: bad})
		require.ErrorIs(t, err, ErrInvalidQueueName, bad)
	}
	_, err = NewWorker(WorkerConfig{Handler: NewJobMux()})
	require.Error(t, err)
	_, err = NewWorker(WorkerConfig{Queues: []WorkerQueue{{Queue: q}}})
	require.Error(t, err)
}

func TestBackoffDelay(t *testing.T) {
	for _, tt := range []struct {
		b       Backoff
		attempt int
		rnd     float64
		want    time.Duration
	}{
		{FixedBackoff(time.Second), 1, 0.9, time.Second},
		{FixedBackoff(time.Second), 5, 0.9, time.Second},
		{ExponentialBackoff(time.Second, time.Minute), 1, 0, time.Second},
		{ExponentialBackoff(time.Second, time.Minute), 3, 0, 4 * time.Second},
		{ExponentialBackoff(time.Second, time.Minute), 3, 0.5, 3600 * time.Millisecond},
		{ExponentialBackoff(time.Second, time.Minute), 30, 0, time.Minute},
		{ExponentialBackoff(time.Second, 0), 200, 0, time.Duration(1<<62) / 1},
	} {
		got := tt.b.Delay(tt.attempt, tt.rnd)
		if tt.want == time.Duration(1<<62) {
			require.Positive(t, got)
			continue
		}
		require.Equal(t, tt.want, got, "%+v attempt %d", tt.b, tt.attempt)
	}
	b, ok := parseBackoff(ExponentialBackoff(time.Second, time.Hour).String())
	require.True(t, ok)
	require.Equal(t, ExponentialBackoff(time.Second, time.Hour), b)
}

// TestEnqueueStates: a job is pending, or scheduled with a delay or a
// run-at; options are stored; bad input is refused and writes nothing.
func TestEnqueueStates(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "states")
		for _, tt := range []struct {
			name string
			opts []JobOption
			want JobState
		}{
			{"now", nil, JobPending},
			{"delay", []JobOption{JobDelay(time.Hour)}, JobScheduled},
			{"run at", []JobOption{JobRunAt(time.Now().Add(time.Hour))}, JobScheduled},
			{"run at in the past", []JobOption{JobRunAt(time.Now().Add(-time.Hour))}, JobPending},
		} {
			t.Run(tt.name, func(t *testing.T) {
				e, err := q.Enqueue(ctx, "t", map[string]int{"n": 1}, append(tt.opts, JobMaxAttempts(5), JobPriority(7), JobChannel("user:1"))...)
				require.NoError(t, err)
				require.Equal(t, tt.want, e.State)
				require.Len(t, e.ID, 22)
				info, err := q.Job(ctx, e.ID)
				require.NoError(t, err)
				require.Equal(t, tt.want, info.State)
				require.Equal(t, 5, info.MaxAttempts)
				require.Equal(t, 7, info.Priority)
				require.Equal(t, "user:1", info.Channel)
				require.JSONEq(t, `{"n":1}`, string(info.Payload))
			})
		}
		counts, err := q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, JobCounts{Pending: 2, Scheduled: 2}, counts)

		_, err = q.Enqueue(ctx, "t", make([]byte, DefaultMaxPayloadBytes+1))
		var tooLarge *PayloadTooLargeError
		require.ErrorAs(t, err, &tooLarge)
		require.ErrorIs(t, err, ErrPayloadTooLarge)
		_, err = q.Enqueue(ctx, "t", nil, JobID("bad id"))
		require.ErrorIs(t, err, ErrInvalidJobID)
		_, err = q.Enqueue(ctx, "", nil)
		require.ErrorIs(t, err, ErrInvalidJobType)
		_, err = q.Enqueue(ctx, "t", nil, JobPriority(101))
		require.Error(t, err)
		counts, err = q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, JobCounts{Pending: 2, Scheduled: 2}, counts, "refused jobs wrote nothing")
		_, err = q.Job(ctx, "x{}")
		require.ErrorIs(t, err, ErrJobNotFound)
		names, err := Queues(ctx, r.Client(), Options{Prefix: r.Keys.Prefix()})
		require.NoError(t, err)
		require.Equal(t, []string{"states"}, names)
	})
}

// TestEnqueueIdempotentAndUnique: concurrent enqueues of one JobID make
// one job; of one unique key, one job and typed errors for the others,
// until the first completes.
func TestEnqueueIdempotentAndUnique(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		clients := []rueidis.Client{r.Client(), r.Client()}
		const n = 20
		var wg sync.WaitGroup
		var created, existing, dups atomic.Int32
		var holder atomic.Value
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				q := newTestQueue(t, r, clients[i%2], "uniq")
				e, err := q.Enqueue(ctx, "t", nil, JobID("same"))
				if err == nil {
					if e.Existing {
						existing.Add(1)
					} else {
						created.Add(1)
					}
				}
				e, err = q.Enqueue(ctx, "t", nil, JobUniqueKey("user:1:welcome"))
				var dup *DuplicateJobError
				switch {
				case errors.As(err, &dup):
					dups.Add(1)
					require.Equal(t, "user:1:welcome", dup.Key)
				case err == nil:
					holder.Store(e.ID)
				}
			}()
		}
		wg.Wait()
		require.Equal(t, int32(1), created.Load())
		require.Equal(t, int32(n-1), existing.Load())
		require.Equal(t, int32(n-1), dups.Load())
		q := newTestQueue(t, r, clients[0], "uniq")
		counts, err := q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, int64(2), counts.Pending)

		// The unique key is released once its job completes.
		startWorker(t, JobHandlerFunc(func(context.Context, *Job) (any, error) { return nil, nil }), nil, q)
		waitState(t, q, holder.Load().(string), JobCompleted, 5*time.Second)
		_, err = q.Enqueue(ctx, "t", nil, JobUniqueKey("user:1:welcome"))
		require.NoError(t, err)
	})
}

// TestWorkerRunsJobs: an idle worker picks a job up within milliseconds,
// stores its result, honours priority, and never runs more than its
// concurrency at once.
func TestWorkerRunsJobs(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "runs")
		var running, peak atomic.Int32
		started := make(chan time.Time, 100)
		mux := NewJobMux()
		mux.HandleFunc("echo", func(ctx context.Context, j *Job) (any, error) {
			started <- time.Now()
			var in map[string]string
			require.NoError(t, j.Decode(&in))
			return map[string]string{"got": in["v"]}, nil
		})
		mux.HandleFunc("slow", func(ctx context.Context, j *Job) (any, error) {
			n := running.Add(1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			time.Sleep(30 * time.Millisecond)
			running.Add(-1)
			return []byte("raw"), nil
		})
		var events sync.Map
		w := startWorker(t, mux, func(c *WorkerConfig) {
			c.Queues[0].Concurrency = 3
			c.OnEvent = func(ev JobEvent) { events.Store(ev.JobID+":"+ev.Kind, ev) }
		}, q)
		time.Sleep(300 * time.Millisecond) // idle: blocked in Redis

		var lat []time.Duration
		for range 5 {
			t0 := time.Now()
			e, err := q.Enqueue(ctx, "echo", map[string]string{"v": "x"})
			require.NoError(t, err)
			select {
			case at := <-started:
				lat = append(lat, at.Sub(t0))
			case <-time.After(2 * time.Second):
				t.Fatal("an idle worker did not pick the job up")
			}
			info := waitState(t, q, e.ID, JobCompleted, 2*time.Second)
			require.JSONEq(t, `{"got":"x"}`, string(info.Result))
			require.Equal(t, 1, info.Attempts)
			require.Eventually(t, func() bool { _, ok := events.Load(e.ID + ":completed"); return ok }, time.Second, time.Millisecond, "OnEvent saw it")
		}
		t.Logf("pickup latencies: %v", lat)
		for _, l := range lat {
			require.Less(t, l, 500*time.Millisecond, "pickup without polling")
		}

		var ids []string
		for range 12 {
			e, err := q.Enqueue(ctx, "slow", nil)
			require.NoError(t, err)
			ids = append(ids, e.ID)
		}
		for _, id := range ids {
			info := waitState(t, q, id, JobCompleted, 5*time.Second)
			require.Equal(t, "raw", string(info.Result))
		}
		require.LessOrEqual(t, peak.Load(), int32(3), "concurrency respected")
		require.Equal(t, uint64(17), w.Stats().Completed)
	})
}

// TestPriorityOrder: ready jobs run by priority, then in order.
func TestPriorityOrder(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "prio")
		for i, p := range []int{0, 5, 100, 5, 0} {
			_, err := q.Enqueue(ctx, "t", nil, JobID(fmt.Sprintf("j%d-p%d", i, p)), JobPriority(p))
			require.NoError(t, err)
		}
		c, err := q.claim(ctx, 5, time.Minute)
		require.NoError(t, err)
		var got []string
		for _, j := range c.jobs {
			got = append(got, j.ID)
		}
		require.Equal(t, []string{"j2-p100", "j1-p5", "j3-p5", "j0-p0", "j4-p0"}, got)
	})
}

// TestRetriesBackoffAndDead: a failing job is retried after its backoff,
// then dies with its error and history; ErrSkipRetry dies at once; a panic
// is a failure; a timeout cancels the handler.
func TestRetriesBackoffAndDead(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "retries", func(c *QueueConfig) { c.Backoff = FixedBackoff(100 * time.Millisecond) })
		var mu sync.Mutex
		runs := map[string][]time.Time{}
		mux := NewJobMux()
		mux.HandleFunc("fail", func(ctx context.Context, j *Job) (any, error) {
			mu.Lock()
			runs[j.ID] = append(runs[j.ID], time.Now())
			mu.Unlock()
			return nil, fmt.Errorf("attempt %d failed", j.Attempt)
		})
		mux.HandleFunc("skip", func(ctx context.Context, j *Job) (any, error) {
			return nil, fmt.Errorf("bad input: %w", ErrSkipRetry)
		})
		mux.HandleFunc("panic", func(ctx context.Context, j *Job) (any, error) { panic("boom") })
		mux.HandleFunc("slow", func(ctx context.Context, j *Job) (any, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		})
		mux.HandleFunc("flaky", func(ctx context.Context, j *Job) (any, error) {
			if j.Attempt < 2 {
				return nil, errors.New("not yet")
			}
			return "ok", nil
		})
		var deadEvents atomic.Int32
		startWorker(t, mux, func(c *WorkerConfig) {
			c.OnEvent = func(ev JobEvent) {
				if ev.Kind == "dead" {
					deadEvents.Add(1)
				}
			}
		}, q)

		f, err := q.Enqueue(ctx, "fail", nil)
		require.NoError(t, err)
		info := waitState(t, q, f.ID, JobDead, 5*time.Second)
		require.Equal(t, 3, info.Attempts)
		require.Equal(t, "attempt 3 failed", info.Error)
		require.Len(t, info.History, 3)
		require.Equal(t, "attempt 1 failed", info.History[0].Error)
		mu.Lock()
		rs := runs[f.ID]
		mu.Unlock()
		require.Len(t, rs, 3)
		for i := 1; i < len(rs); i++ {
			require.GreaterOrEqual(t, rs[i].Sub(rs[i-1]), 90*time.Millisecond, "backoff between attempts")
		}

		for _, tt := range []struct {
			typ, errPart string
			attempts     int
			opts         []JobOption
		}{
			{"skip", "bad input", 1, nil},
			{"panic", "panic: boom", 3, nil},
			{"slow", "timeout", 2, []JobOption{JobTimeout(50 * time.Millisecond), JobMaxAttempts(2)}},
		} {
			e, err := q.Enqueue(ctx, tt.typ, nil, tt.opts...)
			require.NoError(t, err)
			info := waitState(t, q, e.ID, JobDead, 5*time.Second)
			require.Equal(t, tt.attempts, info.Attempts, tt.typ)
			require.Contains(t, info.Error, tt.errPart, tt.typ)
		}
		e, err := q.Enqueue(ctx, "flaky", nil)
		require.NoError(t, err)
		info = waitState(t, q, e.ID, JobCompleted, 5*time.Second)
		require.Equal(t, 2, info.Attempts)
		require.Equal(t, `"ok"`, string(info.Result))
		require.Equal(t, int32(4), deadEvents.Load())

		// The dead job comes back with RetryDead.
		require.ErrorIs(t, q.RetryDead(ctx, e.ID), ErrJobNotFound, "a completed job is not dead")
		require.NoError(t, q.RetryDead(ctx, f.ID))
		waitState(t, q, f.ID, JobDead, 5*time.Second)
	})
}

// TestRearmAfterAbandonedWait: a wait the worker abandoned stays blocked
// in Redis until CLIENT UNBLOCK reaches it, and may eat the wake-up of an
// enqueue made meanwhile. The claim after it rearms the marker, so the
// next wait still sees the enqueue. A second client's BZPOPMIN plays the
// abandoned call.
func TestRearmAfterAbandonedWait(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		for _, tt := range []struct {
			name  string
			rearm bool
			woken bool
		}{
			{"without rearm the enqueue's wake-up is lost", false, false},
			{"with rearm the next wait sees the enqueue", true, true},
		} {
			t.Run(tt.name, func(t *testing.T) {
				ctx := context.Background()
				q := newTestQueue(t, r, r.Client(), fmt.Sprint("rearm", tt.rearm))
				name := fmt.Sprint("rearm-ghost-", tt.rearm)
				ghost := r.Client(func(o *rueidis.ClientOption) { o.ClientName = name })
				popped := make(chan rueidis.RedisResult, 1)
				go func() {
					gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
					defer cancel()
					popped <- ghost.Do(gctx, ghost.B().Bzpopmin().Key(q.keys.marker).Timeout(5).Build())
				}()
				// The ghost is blocked in Redis before the claim.
				require.Eventually(t, func() bool {
					for _, node := range ghost.Nodes() {
						list, err := node.Do(ctx, node.B().ClientList().Build()).ToString()
						for _, line := range strings.Split(list, "\n") {
							if err == nil && strings.Contains(line, "name="+name+" ") && strings.Contains(line, "cmd=bzpopmin") {
								return true
							}
						}
					}
					return false
				}, 5*time.Second, 10*time.Millisecond, "the ghost never blocked")
				c, err := q.claimRearm(ctx, 1, time.Minute, tt.rearm)
				require.NoError(t, err)
				require.Empty(t, c.jobs)
				_, err = q.Enqueue(ctx, "t", nil)
				require.NoError(t, err)
				select {
				case res := <-popped:
					require.NoError(t, res.Error(), "the ghost took a wake-up")
				case <-time.After(5 * time.Second):
					t.Fatal("the ghost was never woken")
				}
				woken, err := q.wait(ctx, 300*time.Millisecond)
				require.NoError(t, err)
				require.Equal(t, tt.woken, woken)
			})
		}
	})
}

// TestDelayedJobsOnTime: an idle worker starts a delayed job, and a retry,
// close to its due time, without polling.
func TestDelayedJobsOnTime(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "delayed")
		started := make(chan time.Time, 10)
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			started <- time.Now()
			return nil, nil
		}), nil, q)
		time.Sleep(200 * time.Millisecond)
		for _, d := range []time.Duration{300 * time.Millisecond, 700 * time.Millisecond} {
			t0 := time.Now()
			_, err := q.Enqueue(ctx, "t", nil, JobDelay(d))
			require.NoError(t, err)
			select {
			case at := <-started:
				late := at.Sub(t0) - d
				t.Logf("delay %v started %v late", d, late)
				require.GreaterOrEqual(t, late, -5*time.Millisecond, "not before its due time")
				require.Less(t, late, 300*time.Millisecond, "close to its due time")
			case <-time.After(5 * time.Second):
				t.Fatal("the delayed job never started")
			}
		}
	})
}

// TestFencing: a worker whose lease expired and whose job was reaped and
// claimed again gets ErrLeaseLost for every transition, and nothing it
// reports applies; repeats of an applied transition are idempotent.
func TestFencing(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "fence")
		e, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		first, err := q.claim(ctx, 1, 100*time.Millisecond)
		require.NoError(t, err)
		require.Len(t, first.jobs, 1)
		old := first.jobs[0]
		time.Sleep(150 * time.Millisecond)
		n, _, err := q.reap(ctx, time.Second, 10)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		n, _, err = q.reap(ctx, time.Second, 10)
		require.NoError(t, err)
		require.Equal(t, -1, n, "one reaper per interval")
		second, err := q.claim(ctx, 1, time.Minute)
		require.NoError(t, err)
		require.Len(t, second.jobs, 1)
		cur := second.jobs[0]
		require.Greater(t, cur.tok, old.tok)
		require.Equal(t, 2, cur.Attempt, "the expired lease counted an attempt")

		require.ErrorIs(t, completeJob(q, ctx, e.ID, old.tok, []byte("late")), ErrLeaseLost)
		_, _, err = q.fail(ctx, e.ID, old.tok, "late", 0, false, false, 0)
		require.ErrorIs(t, err, ErrLeaseLost)
		require.ErrorIs(t, q.progress(ctx, e.ID, old.tok, []byte("1")), ErrLeaseLost)
		require.ErrorIs(t, q.giveBack(ctx, e.ID, old.tok), ErrLeaseLost)
		lost, err := q.heartbeat(ctx, time.Minute, []jobLease{{e.ID, old.tok}, {e.ID, cur.tok}})
		require.NoError(t, err)
		require.Equal(t, []jobLease{{e.ID, old.tok}}, lost)

		require.NoError(t, q.progress(ctx, e.ID, cur.tok, []byte(`{"p":1}`)))
		require.NoError(t, completeJob(q, ctx, e.ID, cur.tok, []byte("done")))
		require.NoError(t, completeJob(q, ctx, e.ID, cur.tok, []byte("done")), "a repeat after a lost reply")
		_, _, err = q.fail(ctx, e.ID, cur.tok, "x", 0, false, false, 0)
		require.ErrorIs(t, err, ErrLeaseLost, "another transition after completion")
		info, err := q.Job(ctx, e.ID)
		require.NoError(t, err)
		require.Equal(t, JobCompleted, info.State)
		require.Equal(t, "done", string(info.Result))
		require.Equal(t, `{"p":1}`, string(info.Progress))
		counts, err := q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, JobCounts{Completed: 1}, counts)
	})
}

// TestStallLimitAndGiveBack: a job that keeps losing its lease dies as
// stalled; a job given back at shutdown does not count an attempt.
func TestStallLimitAndGiveBack(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "stall")
		e, err := q.Enqueue(ctx, "t", nil, JobMaxAttempts(10))
		require.NoError(t, err)
		for i := range 2 {
			c, err := q.claim(ctx, 1, 10*time.Millisecond)
			require.NoError(t, err)
			require.Len(t, c.jobs, 1, "round %d", i)
			time.Sleep(20 * time.Millisecond)
			require.NoError(t, r.Client().Do(ctx, r.Client().B().Del().Key(q.keys.reaper).Build()).Error())
			_, _, err = q.reap(ctx, time.Second, 2)
			require.NoError(t, err)
		}
		info, err := q.Job(ctx, e.ID)
		require.NoError(t, err)
		require.Equal(t, JobDead, info.State)
		require.Contains(t, info.Error, "stalled")

		g, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		c, err := q.claim(ctx, 1, time.Minute)
		require.NoError(t, err)
		require.NoError(t, q.giveBack(ctx, g.ID, c.jobs[0].tok))
		require.NoError(t, q.giveBack(ctx, g.ID, c.jobs[0].tok), "idempotent")
		info, err = q.Job(ctx, g.ID)
		require.NoError(t, err)
		require.Equal(t, JobPending, info.State)
		require.Equal(t, 0, info.Attempts)
	})
}

// TestUnknownJobType: a type no handler knows is put back with a delay,
// without counting attempts, and dies after the limit.
func TestUnknownJobType(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "unknown")
		var runs atomic.Int32
		mux := NewJobMux()
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			runs.Add(1)
			return mux.ProcessJob(ctx, j)
		}), func(c *WorkerConfig) {
			c.UnknownTypeDelay = 50 * time.Millisecond
			c.UnknownTypeLimit = 3
		}, q)
		e, err := q.Enqueue(ctx, "nobody-handles-this", nil)
		require.NoError(t, err)
		info := waitState(t, q, e.ID, JobDead, 5*time.Second)
		require.Contains(t, info.Error, "no handler")
		require.Equal(t, int32(4), runs.Load(), "put back 3 times, then dead: no hot loop")
		require.Equal(t, 0, info.Attempts)
	})
}

// TestCancelPauseResume: pending and scheduled jobs can be cancelled
// (their unique key is released); a paused queue starts nothing until
// resumed.
func TestCancelPauseResume(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "cancel")
		a, err := q.Enqueue(ctx, "t", nil, JobUniqueKey("k"))
		require.NoError(t, err)
		b, err := q.Enqueue(ctx, "t", nil, JobDelay(time.Hour))
		require.NoError(t, err)
		require.NoError(t, q.Cancel(ctx, a.ID))
		require.NoError(t, q.Cancel(ctx, b.ID))
		require.ErrorIs(t, q.Cancel(ctx, a.ID), ErrJobNotFound)
		_, err = q.Enqueue(ctx, "t", nil, JobUniqueKey("k"))
		require.NoError(t, err, "the unique key was released")
		c, err := q.claim(ctx, 1, time.Minute)
		require.NoError(t, err)
		require.ErrorIs(t, q.Cancel(ctx, c.jobs[0].ID), ErrJobNotCancellable)

		require.NoError(t, q.Pause(ctx))
		paused, err := q.Paused(ctx)
		require.NoError(t, err)
		require.True(t, paused)
		var ran atomic.Int32
		startWorker(t, JobHandlerFunc(func(context.Context, *Job) (any, error) { ran.Add(1); return nil, nil }), nil, q)
		d, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		time.Sleep(300 * time.Millisecond)
		require.Zero(t, ran.Load(), "paused")
		require.NoError(t, q.Resume(ctx))
		waitState(t, q, d.ID, JobCompleted, 2*time.Second)
	})
}

// TestInspector: listing by state with pagination, deleting finished jobs,
// purging in batches, retention by count.
func TestInspector(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "inspect", func(c *QueueConfig) { c.KeepCompleted = 5 })
		for i := range 8 {
			_, err := q.Enqueue(ctx, "t", nil, JobID(fmt.Sprintf("job%d", i)))
			require.NoError(t, err)
		}
		page, err := q.Jobs(ctx, JobPending, 2, 3)
		require.NoError(t, err)
		require.Len(t, page, 3)
		require.Equal(t, "job2", page[0].ID)
		c, err := q.claim(ctx, 8, time.Minute)
		require.NoError(t, err)
		for _, j := range c.jobs {
			require.NoError(t, completeJob(q, ctx, j.ID, j.tok, nil))
		}
		counts, err := q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, int64(5), counts.Completed, "KeepCompleted")
		_, err = q.Job(ctx, "job0")
		require.ErrorIs(t, err, ErrJobNotFound, "trimmed with its hash")
		done, err := q.Jobs(ctx, JobCompleted, 0, 10)
		require.NoError(t, err)
		require.Equal(t, "job7", done[0].ID, "newest first")
		require.NoError(t, q.DeleteJob(ctx, "job7"))
		require.ErrorIs(t, q.DeleteJob(ctx, "job7"), ErrJobNotFound)

		for i := range 250 {
			_, err := q.Enqueue(ctx, "t", nil, JobDelay(time.Hour), JobID(fmt.Sprintf("later%d", i)))
			require.NoError(t, err)
		}
		n, err := q.Purge(ctx, JobScheduled)
		require.NoError(t, err)
		require.Equal(t, 250, n)
		_, err = q.Purge(ctx, JobActive)
		require.Error(t, err)
		counts, err = q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, JobCounts{Completed: 4}, counts)
	})
}

// TestWorkerShutdown: Shutdown waits for running jobs; past its deadline
// it cancels them and returns them without counting the attempt.
func TestWorkerShutdown(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "shutdown")
		started := make(chan string, 4)
		w, err := NewWorker(WorkerConfig{Queues: []WorkerQueue{{Queue: q, Concurrency: 2}}, Handler: JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			started <- j.ID
			<-ctx.Done()
			time.Sleep(50 * time.Millisecond) // a handler slow to notice
			return nil, ctx.Err()
		})})
		require.NoError(t, err)
		require.NoError(t, w.Start())
		require.ErrorIs(t, w.Start(), ErrWorkerStarted)
		e, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		<-started
		sctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		require.ErrorIs(t, w.Shutdown(sctx), context.DeadlineExceeded)
		info, err := q.Job(ctx, e.ID)
		require.NoError(t, err)
		require.Equal(t, JobPending, info.State)
		require.Equal(t, 0, info.Attempts, "a shutdown does not count an attempt")
	})
}

// TestLeaseLostCancelsHandler: a job whose worker stops heartbeating
// (here: a handler that outlives a short lease on a worker whose
// heartbeats cannot reach Redis is simulated by a second worker reaping it)
// gets its context cancelled, and its late completion is not applied.
func TestLeaseLostCancelsHandler(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "lease")
		e, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		// An old worker claimed it and went silent (no heartbeats).
		old, err := q.claim(ctx, 1, 200*time.Millisecond)
		require.NoError(t, err)
		require.Len(t, old.jobs, 1)
		// A live worker reaps it and runs it again.
		var attempts atomic.Int32
		startWorker(t, JobHandlerFunc(func(context.Context, *Job) (any, error) { attempts.Add(1); return "second", nil }), func(c *WorkerConfig) {
			c.ReapInterval = 100 * time.Millisecond
		}, newTestQueue(t, r, r.Client(), "lease"))
		info := waitState(t, q, e.ID, JobCompleted, 5*time.Second)
		require.Equal(t, 2, info.Attempts)
		require.ErrorIs(t, completeJob(q, ctx, e.ID, old.jobs[0].tok, []byte("first")), ErrLeaseLost)
		info, err = q.Job(ctx, e.ID)
		require.NoError(t, err)
		require.Equal(t, `"second"`, string(info.Result))
		require.Equal(t, int32(1), attempts.Load())
	})
}

// TestEventsReachHub: a job with a channel publishes its progress and
// completion to the hub, which an SSE client of that channel receives.
func TestEventsReachHub(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		client := r.Client()
		hub := newTestHub(t, r, client, nil)
		app := newRTApp(t, hub, nil, nil)
		s, _ := app.open(t, app.events([]string{"user:9"}), header("X-User", "9"))
		defer s.Close()
		q := newTestQueue(t, r, client, "events", func(c *QueueConfig) { c.Hub = hub })
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			require.NoError(t, j.Progress(ctx, map[string]int{"pct": 50}))
			return map[string]bool{"sent": true}, nil
		}), nil, q)
		e, err := q.Enqueue(ctx, "t", nil, JobChannel("user:9"))
		require.NoError(t, err)
		ev := s.Next(t)
		require.Equal(t, "job:progress", ev.Name)
		require.JSONEq(t, fmt.Sprintf(`{"id":%q,"queue":"events","type":"t","attempt":1,"progress":{"pct":50}}`, e.ID), ev.Data)
		ev = s.Next(t)
		require.Equal(t, "job:completed", ev.Name)
		require.JSONEq(t, fmt.Sprintf(`{"id":%q,"queue":"events","type":"t","attempt":1,"result":{"sent":true}}`, e.ID), ev.Data)
	})
}

// TestIdleWorkerKeepsBreakerClosed: a worker idle for more than 10 s,
// blocked in Redis, records no failure and never changes the breaker that
// the client's other features share.
func TestIdleWorkerKeepsBreakerClosed(t *testing.T) {
	t.Parallel()
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		t.Parallel()
		client := r.Client()
		q := newTestQueue(t, r, client, "idle")
		startWorker(t, JobHandlerFunc(func(context.Context, *Job) (any, error) { return nil, nil }), nil, q)
		time.Sleep(11 * time.Second)
		for _, s := range BreakerFor(client).Stats() {
			require.Equal(t, BreakerClosed, s.State, s.Scope)
			require.Zero(t, s.Failures, s.Scope)
			require.Zero(t, s.Opened, s.Scope)
			require.Zero(t, s.Rejected, s.Scope)
		}
		e, err := q.Enqueue(context.Background(), "t", nil)
		require.NoError(t, err)
		waitState(t, q, e.ID, JobCompleted, 2*time.Second)
	})
}

// TestWorkerSurvivesPausedRedis: while Redis is paused, Enqueue fails
// within its deadline and workers back off; once it resumes, every job
// that Enqueue acknowledged completes, without a restart.
func TestWorkerSurvivesPausedRedis(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		ctx := context.Background()
		client := f.Client()
		q := newTestQueue(t, f.testRedis, client, "paused", func(c *QueueConfig) {
			c.Timeout = 300 * time.Millisecond
			c.Breaker = NewBreaker(BreakerConfig{Failures: 3, Cooldown: 500 * time.Millisecond})
		})
		startWorker(t, JobHandlerFunc(func(context.Context, *Job) (any, error) {
			time.Sleep(5 * time.Millisecond)
			return nil, nil
		}), func(c *WorkerConfig) { c.Lease = 3 * time.Second }, q)
		var acked []string
		for range 20 {
			e, err := q.Enqueue(ctx, "t", nil)
			require.NoError(t, err)
			acked = append(acked, e.ID)
		}
		f.Pause(t)
		t0 := time.Now()
		_, err := q.Enqueue(ctx, "t", nil)
		require.Error(t, err)
		require.Less(t, time.Since(t0), 2*time.Second, "Enqueue returns within its deadline")
		time.Sleep(1500 * time.Millisecond)
		f.Resume(t)
		for range 20 {
			require.Eventually(t, func() bool {
				e, err := q.Enqueue(ctx, "t", nil)
				if err == nil {
					acked = append(acked, e.ID)
				}
				return err == nil
			}, 10*time.Second, 50*time.Millisecond)
		}
		for _, id := range acked {
			waitState(t, q, id, JobCompleted, 15*time.Second)
		}
		f.KillConnections(t)
		e, err := q.Enqueue(ctx, "t", nil)
		for err != nil {
			time.Sleep(50 * time.Millisecond)
			e, err = q.Enqueue(ctx, "t", nil)
		}
		waitState(t, q, e.ID, JobCompleted, 10*time.Second)
	})
}

// TestJobInspectorHandler: the inspector's JSON read side, mounted under
// a wildcard, on both topologies.
func TestJobInspectorHandler(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		client := r.Client()
		q := newTestQueue(t, r, client, "mail")
		other := newTestQueue(t, r, client, "other")
		e, err := q.Enqueue(ctx, "send", map[string]string{"to": "a@b"}, JobID("job-1"))
		require.NoError(t, err)
		_, err = q.Enqueue(ctx, "send", []byte("not json"), JobDelay(time.Hour))
		require.NoError(t, err)
		ec := echo.New()
		ec.GET("/admin/jobs/*", JobInspector(q, other))
		srv := httptest.NewServer(ec)
		defer srv.Close()
		get := func(path string) (int, map[string]any) {
			resp, err := http.Get(srv.URL + path)
			require.NoError(t, err)
			defer resp.Body.Close()
			var out map[string]any
			_ = json.NewDecoder(resp.Body).Decode(&out)
			return resp.StatusCode, out
		}
		for _, tt := range []struct {
			path string
			code int
			want string
		}{
			{"/admin/jobs/", 200, `"queues"`},
			{"/admin/jobs/mail", 200, `"pending":1`},
			{"/admin/jobs/mail/pending", 200, `"job-1"`},
			{"/admin/jobs/mail/scheduled?limit=1", 200, `"state":"scheduled"`},
			{"/admin/jobs/mail/jobs/" + e.ID, 200, `"to":"a@b"`},
			{"/admin/jobs/mail/jobs/nope", 404, `job not found`},
			{"/admin/jobs/mail/jobs/x%7B%7D", 404, `job not found`},
			{"/admin/jobs/nope", 404, `queue not found`},
			{"/admin/jobs/mail/frozen", 404, `state not found`},
			{"/admin/jobs/mail/pending?limit=100000", 400, `limit`},
			{"/admin/jobs/mail/pending?offset=-1", 400, `offset`},
		} {
			code, out := get(tt.path)
			b, _ := json.Marshal(out)
			require.Equal(t, tt.code, code, tt.path)
			require.Contains(t, string(b), tt.want, tt.path)
		}
		_, out := get("/admin/jobs/mail/scheduled")
		jobs := out["jobs"].([]any)
		require.Len(t, jobs, 1)
		_, hasPayload := jobs[0].(map[string]any)["payload"]
		require.False(t, hasPayload, "lists leave payloads out")
		_, err = JobInspectorConfig{}.ToHandler()
		require.Error(t, err)
	})
}

// completeJob completes a job under tok without claiming a next one.
func completeJob(q *Queue, ctx context.Context, id string, tok int64, result []byte) error {
	_, err := q.complete(ctx, id, tok, result, false, 0)
	return err
}

// BenchmarkEnqueue measures Enqueue's own cost (allocations, CPU) on the
// standalone server. Throughput against asynq comes from the bench/
// harness (go run . jobs).
func BenchmarkEnqueue(b *testing.B) {
	r := newTestRedis(b, standaloneRedis.name, standaloneRedis.addrs)
	q, err := NewQueue(QueueConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}, Name: "bench"})
	require.NoError(b, err)
	ctx := context.Background()
	b.ReportAllocs()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := q.Enqueue(ctx, "t", nil); err != nil {
				b.Error(err)
				return
			}
		}
	})
	_, _ = q.Purge(ctx, JobPending)
}

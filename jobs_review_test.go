package redisecho

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Tests from the release review of the job queue: each one failed before
// its fix.

// TestFencingAcrossIncarnations: a job ID used again (the first job was
// cancelled after its worker lost the lease) gets tokens the stale worker
// never held, so that worker's late outcome is refused.
func TestFencingAcrossIncarnations(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "reuse")
		_, err := q.Enqueue(ctx, "t", nil, JobID("welcome-42"))
		require.NoError(t, err)
		stale, err := q.claim(ctx, 1, 50*time.Millisecond)
		require.NoError(t, err)
		require.Len(t, stale.jobs, 1)
		time.Sleep(80 * time.Millisecond)
		n, _, err := q.reap(ctx, time.Second, 10)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		require.NoError(t, q.Cancel(ctx, "welcome-42"))

		_, err = q.Enqueue(ctx, "t", []byte("second"), JobID("welcome-42"))
		require.NoError(t, err)
		cur, err := q.claim(ctx, 1, time.Minute)
		require.NoError(t, err)
		require.Len(t, cur.jobs, 1)
		require.NotEqual(t, stale.jobs[0].tok, cur.jobs[0].tok, "a token of the first job")

		require.ErrorIs(t, completeJob(q, ctx, "welcome-42", stale.jobs[0].tok, []byte("stale")), ErrLeaseLost)
		info, err := q.Job(ctx, "welcome-42")
		require.NoError(t, err)
		require.Equal(t, JobActive, info.State)
		require.NoError(t, completeJob(q, ctx, "welcome-42", cur.jobs[0].tok, []byte("fresh")))
	})
}

// TestWorkerRerunsJobWhileLastRunWinds: a job retried at once can be
// claimed again by the same worker while the goroutine of its failed
// attempt still reports it (a slow OnEvent, a hub publish). The new run
// keeps its lease renewed: it is neither reaped nor run twice at once.
func TestWorkerRerunsJobWhileLastRunWinds(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "rerun")
		var running, overlap, runs atomic.Int32
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			runs.Add(1)
			if running.Add(1) > 1 {
				overlap.Add(1)
			}
			defer running.Add(-1)
			if j.Attempt == 1 {
				return nil, errors.New("first attempt fails")
			}
			select { // outlive two leases: only heartbeats keep it
			case <-time.After(1200 * time.Millisecond):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			return "ok", nil
		}), func(c *WorkerConfig) {
			c.Lease = 500 * time.Millisecond
			c.ReapInterval = 100 * time.Millisecond
			c.RetryDelay = func(*Job, error) time.Duration { return 0 }
			c.OnEvent = func(ev JobEvent) {
				if ev.Kind == "failed" {
					time.Sleep(300 * time.Millisecond) // the failed run winds down slowly
				}
			}
		}, q)
		e, err := q.Enqueue(ctx, "t", nil, JobMaxAttempts(5))
		require.NoError(t, err)
		info := waitState(t, q, e.ID, JobCompleted, 10*time.Second)
		require.Equal(t, 2, info.Attempts, "the second run was reaped: %+v", info.History)
		require.Equal(t, int32(2), runs.Load())
		require.Zero(t, overlap.Load(), "runs of one job overlapped")
	})
}

// TestWorkerShutdownReturnsWhenJobsEnd: Shutdown returns as soon as the
// running jobs end, not at the next heartbeat (a third of the lease).
func TestWorkerShutdownReturnsWhenJobsEnd(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "prompt")
		started, release := make(chan struct{}), make(chan struct{})
		w, err := NewWorker(WorkerConfig{Queues: []WorkerQueue{{Queue: q, Concurrency: 1}}, Lease: 30 * time.Second,
			Handler: JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
				close(started)
				<-release
				return nil, nil
			})})
		require.NoError(t, err)
		require.NoError(t, w.Start())
		e, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		<-started
		go func() { time.Sleep(100 * time.Millisecond); close(release) }()
		sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		begin := time.Now()
		require.NoError(t, w.Shutdown(sctx))
		require.Less(t, time.Since(begin), 3*time.Second, "Shutdown waited for a heartbeat tick")
		waitState(t, q, e.ID, JobCompleted, time.Second)
	})
}

// TestWorkerShutdownBoundedWhenRedisHangs: a Shutdown whose ctx ends while
// Redis is frozen tries to give its jobs back for a moment, not for the
// rest of their lease; the jobs come back through the reaper instead.
func TestWorkerShutdownBoundedWhenRedisHangs(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		ctx := context.Background()
		q := newTestQueue(t, f.testRedis, f.Client(), "hang", func(c *QueueConfig) { c.Timeout = 200 * time.Millisecond })
		started := make(chan struct{}, 1)
		w, err := NewWorker(WorkerConfig{Queues: []WorkerQueue{{Queue: q, Concurrency: 1}}, Lease: 10 * time.Second,
			Handler: JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
				started <- struct{}{}
				<-ctx.Done()
				return nil, ctx.Err()
			})})
		require.NoError(t, err)
		require.NoError(t, w.Start())
		_, err = q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		<-started
		f.Pause(t)
		sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		begin := time.Now()
		require.ErrorIs(t, w.Shutdown(sctx), context.DeadlineExceeded)
		require.Less(t, time.Since(begin), 4*time.Second, "Shutdown kept giving back for the job's lease (10 s)")
		f.Resume(t)
	})
}

// TestLeaseRunsOutWhileRedisFrozen: a worker that cannot reach Redis to
// renew a lease stops the job once the lease has run out by its own clock
// (it may have been reaped and run elsewhere), without waiting for Redis
// to say so; the job runs again once Redis is back.
func TestLeaseRunsOutWhileRedisFrozen(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		ctx := context.Background()
		q := newTestQueue(t, f.testRedis, f.Client(), "frozen", func(c *QueueConfig) {
			c.Timeout = 200 * time.Millisecond
			c.Breaker = NewBreaker(BreakerConfig{Failures: 3, Cooldown: 200 * time.Millisecond})
		})
		started := make(chan struct{}, 2)
		causes := make(chan error, 2)
		var runs atomic.Int32
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			if runs.Add(1) > 1 {
				return "second", nil
			}
			started <- struct{}{}
			<-ctx.Done()
			causes <- context.Cause(ctx)
			return nil, ctx.Err()
		}), func(c *WorkerConfig) { c.Lease = 900 * time.Millisecond }, q)
		e, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		<-started
		f.Pause(t)
		frozen := time.Now()
		// Redis stays frozen until the handler is stopped: without the
		// worker's own reckoning it would run until Redis came back. (About
		// the lease, 0.9 s, plus a beat and a timeout; a loaded machine
		// stretches that, so the bound is loose.)
		select {
		case cause := <-causes:
			require.ErrorIs(t, cause, ErrLeaseLost)
			t.Logf("stopped %v after Redis froze", time.Since(frozen))
		case <-time.After(20 * time.Second):
			t.Fatal("the handler still runs 20 s after its lease ran out with Redis frozen")
		}
		f.Resume(t)
		info := waitState(t, q, e.ID, JobCompleted, 10*time.Second)
		require.Equal(t, `"second"`, string(info.Result))
		require.Equal(t, uint64(1), q.Stats().LeasesLost, "the loss is counted once")
	})
}

// TestPanickingHooks: an OnEvent or RetryDelay that panics is logged and
// recovered; the process lives, the job's outcome is recorded, and a
// panicking RetryDelay falls back to the job's own Backoff.
func TestPanickingHooks(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "hooks")
		var events atomic.Int32
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			if j.Type == "fail" && j.Attempt == 1 {
				return nil, errors.New("first attempt fails")
			}
			return "ok", nil
		}), func(c *WorkerConfig) {
			c.OnEvent = func(JobEvent) { events.Add(1); panic("OnEvent boom") }
			c.RetryDelay = func(*Job, error) time.Duration { panic("RetryDelay boom") }
		}, q)
		ok, err := q.Enqueue(ctx, "ok", nil)
		require.NoError(t, err)
		fail, err := q.Enqueue(ctx, "fail", nil, JobBackoff(FixedBackoff(50*time.Millisecond)))
		require.NoError(t, err)
		waitState(t, q, ok.ID, JobCompleted, 5*time.Second)
		info := waitState(t, q, fail.ID, JobCompleted, 5*time.Second)
		require.Equal(t, 2, info.Attempts, "retried after the job's own 50 ms backoff")
		// Events follow the transitions they report.
		require.Eventually(t, func() bool { return events.Load() >= 3 }, 2*time.Second, 5*time.Millisecond, "completed, failed, completed")
	})
}

// TestCompleteHandsOverNextJob: a completion claims the slot's next job in
// the same call; a repeat of it (its reply was lost) hands back the same
// job under the same lease, never a second one; a paused queue or a
// worker that asks for none gets none.
func TestCompleteHandsOverNextJob(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "handover")
		var ids []string
		for range 3 {
			e, err := q.Enqueue(ctx, "t", nil)
			require.NoError(t, err)
			ids = append(ids, e.ID)
		}
		c, err := q.claim(ctx, 1, time.Minute)
		require.NoError(t, err)
		require.Len(t, c.jobs, 1)
		a := c.jobs[0]
		require.Equal(t, ids[0], a.ID)

		next, err := q.complete(ctx, a.ID, a.tok, []byte(`1`), true, time.Minute)
		require.NoError(t, err)
		require.NotNil(t, next)
		require.Equal(t, ids[1], next.ID, "FIFO")
		require.Equal(t, 1, next.Attempt)
		info, err := q.Job(ctx, next.ID)
		require.NoError(t, err)
		require.Equal(t, JobActive, info.State)

		again, err := q.complete(ctx, a.ID, a.tok, []byte(`1`), true, time.Minute)
		require.NoError(t, err, "a repeat")
		require.NotNil(t, again)
		require.Equal(t, next.ID, again.ID)
		require.Equal(t, next.tok, again.tok, "the same lease")
		counts, err := q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, JobCounts{Pending: 1, Active: 1, Completed: 1}, counts)

		require.NoError(t, q.Pause(ctx))
		none, err := q.complete(ctx, next.ID, next.tok, nil, true, time.Minute)
		require.NoError(t, err)
		require.Nil(t, none, "paused")
		require.NoError(t, q.Resume(ctx))
		c, err = q.claim(ctx, 1, time.Minute)
		require.NoError(t, err)
		require.Len(t, c.jobs, 1)
		none, err = q.complete(ctx, c.jobs[0].ID, c.jobs[0].tok, nil, false, time.Minute)
		require.NoError(t, err)
		require.Nil(t, none, "not asked")
		counts, err = q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, JobCounts{Completed: 3}, counts)
	})
}

// TestRetentionBounds: the done set is trimmed in batches, so it holds at
// most KeepCompleted + KeepCompleted/32 (and never more than +32), and
// jobs older than KeepCompletedFor go on the next completion.
func TestRetentionBounds(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		cases := []struct {
			keep  int
			bound int64
		}{{5, 5}, {64, 66}, {2048, 2048 + 32}}
		for _, tc := range cases {
			q := newTestQueue(t, r, r.Client(), fmt.Sprintf("keep%d", tc.keep), func(c *QueueConfig) { c.KeepCompleted = tc.keep })
			total := tc.keep + 200
			jobs := make([]BatchJob, total)
			for i := range jobs {
				jobs[i] = BatchJob{Type: "t"}
			}
			_, err := q.EnqueueBatch(ctx, jobs)
			require.NoError(t, err)
			var peak int64
			for done := 0; done < total; {
				c, err := q.claim(ctx, 16, time.Minute)
				require.NoError(t, err)
				for _, j := range c.jobs {
					require.NoError(t, completeJob(q, ctx, j.ID, j.tok, nil))
					done++
					counts, err := q.Counts(ctx)
					require.NoError(t, err)
					peak = max(peak, counts.Completed)
				}
			}
			require.LessOrEqual(t, peak, tc.bound, "keep %d", tc.keep)
			require.GreaterOrEqual(t, peak, int64(tc.keep))
		}

		q := newTestQueue(t, r, r.Client(), "age", func(c *QueueConfig) { c.KeepCompletedFor = 200 * time.Millisecond })
		finish := func(n int) {
			for range n {
				_, err := q.Enqueue(ctx, "t", nil)
				require.NoError(t, err)
				c, err := q.claim(ctx, 1, time.Minute)
				require.NoError(t, err)
				require.NoError(t, completeJob(q, ctx, c.jobs[0].ID, c.jobs[0].tok, nil))
			}
		}
		finish(10)
		time.Sleep(300 * time.Millisecond)
		finish(1)
		counts, err := q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, int64(1), counts.Completed, "the old ten went with the next completion")
	})
}

// TestNoSpuriousLeaseLoss: a heartbeat that races a run's completion (the
// job is no longer active because it just finished) counts no lost lease.
func TestNoSpuriousLeaseLoss(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "racebeat", func(c *QueueConfig) { c.KeepCompleted = 10000 })
		const total = 2000
		jobs := make([]BatchJob, total)
		for i := range jobs {
			jobs[i] = BatchJob{Type: "t"}
		}
		_, err := q.EnqueueBatch(ctx, jobs)
		require.NoError(t, err)
		startWorker(t, JobHandlerFunc(func(context.Context, *Job) (any, error) {
			time.Sleep(200 * time.Microsecond)
			return nil, nil
		}), func(c *WorkerConfig) {
			c.Lease = 150 * time.Millisecond // a heartbeat every 50 ms
			c.Queues[0].Concurrency = 16
		}, q)
		require.Eventually(t, func() bool {
			c, err := q.Counts(ctx)
			return err == nil && c.Completed == total
		}, 60*time.Second, 20*time.Millisecond)
		require.Zero(t, q.Stats().LeasesLost)
	})
}

// TestFinishOrderSurvivesClockStep: when Redis's clock steps back (a
// failover to a host behind), a finished job still scores above the
// others, so the count trim never takes the job just completed.
func TestFinishOrderSurvivesClockStep(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		client := r.Client()
		q := newTestQueue(t, r, client, "step", func(c *QueueConfig) { c.KeepCompleted = 10 })
		ahead := time.Now().Add(time.Hour).UnixMicro()
		for i := range 10 {
			require.NoError(t, client.Do(ctx, client.B().Zadd().Key(q.keys.done).ScoreMember().
				ScoreMember(float64(ahead+int64(i)), fmt.Sprintf("old%d", i)).Build()).Error())
		}
		e, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		c, err := q.claim(ctx, 1, time.Minute)
		require.NoError(t, err)
		require.NoError(t, completeJob(q, ctx, e.ID, c.jobs[0].tok, nil))
		info, err := q.Job(ctx, e.ID)
		require.NoError(t, err, "the job just completed is kept")
		require.Equal(t, JobCompleted, info.State)
		done, err := q.Jobs(ctx, JobCompleted, 0, 1)
		require.NoError(t, err)
		require.Equal(t, e.ID, done[0].ID, "newest first")
	})
}

// TestDueJobsWhileBusy: while every slot passes straight from one job to
// the next (completions claim the next job, the fetcher never runs), a
// delayed job and a retry are still promoted when due, ahead of the
// backlog of lower priority.
func TestDueJobsWhileBusy(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		q := newTestQueue(t, r, r.Client(), "busy")
		backlog := make([]BatchJob, 3000)
		for i := range backlog {
			backlog[i] = BatchJob{Type: "filler"}
		}
		_, err := q.EnqueueBatch(ctx, backlog)
		require.NoError(t, err)
		var failedOnce atomic.Bool
		ran := make(chan string, 4)
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			switch j.Type {
			case "filler":
				time.Sleep(time.Millisecond)
			case "retry":
				if !failedOnce.Swap(true) {
					return nil, errors.New("once")
				}
				ran <- j.Type
			default:
				ran <- j.Type
			}
			return nil, nil
		}), func(c *WorkerConfig) { c.Queues[0].Concurrency = 2 }, q)
		time.Sleep(100 * time.Millisecond) // busy now
		t0 := time.Now()
		_, err = q.Enqueue(ctx, "delayed", nil, JobDelay(200*time.Millisecond), JobPriority(100))
		require.NoError(t, err)
		_, err = q.Enqueue(ctx, "retry", nil, JobPriority(100), JobBackoff(FixedBackoff(200*time.Millisecond)))
		require.NoError(t, err)
		got := map[string]time.Duration{}
		for len(got) < 2 {
			select {
			case typ := <-ran:
				got[typ] = time.Since(t0)
			case <-time.After(5 * time.Second):
				t.Fatalf("due jobs not run while the queue is busy: %v", got)
			}
		}
		counts, err := q.Counts(ctx)
		require.NoError(t, err)
		require.Positive(t, counts.Pending, "the backlog was still there: they jumped it")
		t.Logf("delayed ran after %v, retry after %v (both due at 200 ms)", got["delayed"], got["retry"])
	})
}

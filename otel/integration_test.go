package otelredisecho

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/redisecho/redisecho"
	"github.com/redisecho/redisecho/internal/redistest"
)

// forEachTopology runs body on the standalone server and on the cluster.
func forEachTopology(t *testing.T, body func(t *testing.T, tp *redistest.Topology)) {
	for _, tp := range []*redistest.Topology{standalone, cluster} {
		t.Run(tp.Name, func(t *testing.T) { body(t, tp) })
	}
}

// TestJobsThroughTheBridge: a job enqueued under a request's span runs
// under a span of its own, linked to it; the job counters, durations and
// queue-depth gauge say what happened; the breaker gauge reports each node.
func TestJobsThroughTheBridge(t *testing.T) {
	forEachTopology(t, func(t *testing.T, tp *redistest.Topology) {
		s := newTestSDK(t, Config{})
		client := newClient(t, tp)
		opts := redisecho.Options{Prefix: uniquePrefix(t, tp), Observer: s.obs}
		q, err := redisecho.NewQueue(redisecho.QueueConfig{Client: client, Options: opts, Name: "mail"})
		require.NoError(t, err)

		var handlerSpans atomic.Int64
		mux := redisecho.NewJobMux()
		mux.HandleFunc("send", func(ctx context.Context, job *redisecho.Job) (any, error) {
			if trace.SpanContextFromContext(ctx).IsValid() {
				handlerSpans.Add(1)
			}
			if string(job.Payload) == `"bad"` {
				return nil, errors.New("smtp said no")
			}
			return "sent", nil
		})
		w, err := redisecho.NewWorker(redisecho.WorkerConfig{Handler: mux, Logger: opts.Logger,
			Queues: []redisecho.WorkerQueue{{Queue: q, Concurrency: 2}}})
		require.NoError(t, err)

		reqCtx, req := s.tp.Tracer("test").Start(context.Background(), "POST /emails")
		for _, p := range []string{"ok", "ok", "bad"} {
			_, err := q.Enqueue(reqCtx, "send", p, redisecho.JobMaxAttempts(1))
			require.NoError(t, err)
		}
		req.End()
		require.NoError(t, w.Start())
		t.Cleanup(func() { _ = w.Shutdown(context.Background()) })
		require.Eventually(t, func() bool {
			st := w.Stats()
			return st.Completed == 2 && st.Dead == 1
		}, 10*time.Second, 10*time.Millisecond)

		ms := s.collect(t)
		queue := AttrQueue.String("mail")
		for name, want := range map[string]int64{"redisecho.jobs.enqueued": 3, "redisecho.jobs.started": 3, "redisecho.jobs.completed": 2,
			"redisecho.jobs.failed": 1, "redisecho.jobs.dead": 1} {
			got, ok := sum(t, ms, name, queue)
			require.True(t, ok, name)
			require.Equal(t, want, got, name)
		}
		n, _ := hist(t, ms, "redisecho.jobs.duration", queue, AttrResult.String("completed"))
		require.Equal(t, uint64(2), n)
		n, _ = hist(t, ms, "redisecho.jobs.pickup.latency", queue)
		require.Equal(t, uint64(3), n)
		for state, want := range map[string]int64{"completed": 2, "dead": 1, "pending": 0, "active": 0} {
			got, ok := sum(t, ms, "redisecho.jobs.depth", queue, AttrJobState.String(state))
			require.True(t, ok, state)
			require.Equal(t, want, got, state)
		}
		states := ms["redisecho.redis.breaker.state"]
		require.NotEmpty(t, states.Data, "the breaker gauge reports the nodes used")

		var attempts []string
		for _, sp := range s.spans.GetSpans() {
			if sp.Name != "process mail" {
				continue
			}
			attempts = append(attempts, sp.Status.Code.String())
			require.Len(t, sp.Links, 1, "linked to the request that enqueued it")
			require.Equal(t, req.SpanContext().SpanID(), sp.Links[0].SpanContext.SpanID())
			require.Contains(t, sp.Attributes, attribute.String("redisecho.job.type", "send"))
		}
		require.ElementsMatch(t, []string{"Unset", "Unset", "Error"}, attempts)
		require.Equal(t, int64(3), handlerSpans.Load(), "the handler runs under the attempt's span")
	})
}

package redisecho

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/stretchr/testify/require"
)

type smokeFrame struct{ event, id, data string }

func smokeRead(t *testing.T, r *bufio.Reader) smokeFrame {
	var f smokeFrame
	for {
		line, err := r.ReadString('\n')
		require.NoError(t, err)
		line = strings.TrimRight(line, "\n")
		switch {
		case line == "":
			if f.event != "" || f.data != "" {
				return f
			}
		case strings.HasPrefix(line, "event: "):
			f.event = line[7:]
		case strings.HasPrefix(line, "id: "):
			f.id = line[4:]
		case strings.HasPrefix(line, "data: "):
			f.data += line[6:]
		}
	}
}

func TestRealtimeSmoke(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		hubs := make([]*Hub, 2)
		srvs := make([]*httptest.Server, 2)
		for i := range hubs {
			h, err := NewHub(HubConfig{Client: r.Client(), Options: Options{Prefix: r.Keys.Prefix()}})
			require.NoError(t, err)
			hubs[i] = h
			e := echo.New()
			e.GET("/events", SSE(h))
			srvs[i] = httptest.NewServer(e)
			t.Cleanup(srvs[i].Close)
			t.Cleanup(func() { _ = h.Shutdown(context.Background()) })
		}
		resp, err := http.Get(srvs[1].URL + "/events?channels=room,other")
		require.NoError(t, err)
		defer resp.Body.Close()
		require.Equal(t, 200, resp.StatusCode)
		br := bufio.NewReader(resp.Body)
		ctx := context.Background()
		var last string
		for i := 0; i < 3; i++ {
			p, err := hubs[0].Publish(ctx, "room", Event{Name: "chat:message", Data: []byte(`{"n":` + string(rune('0'+i)) + `}`)})
			require.NoError(t, err)
			f := smokeRead(t, br)
			require.Equal(t, "chat:message", f.event)
			require.Equal(t, uint64(i+1), p.Offset)
			last = f.id
		}
		resp.Body.Close()
		for i := 3; i < 6; i++ {
			_, err := hubs[0].Publish(ctx, "room", Event{Name: "chat:message", Data: []byte(`{"n":` + string(rune('0'+i)) + `}`)})
			require.NoError(t, err)
		}
		req, _ := http.NewRequest("GET", srvs[0].URL+"/events?channels=room,other", nil)
		req.Header.Set("Last-Event-ID", last)
		resp2, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp2.Body.Close()
		br = bufio.NewReader(resp2.Body)
		for i := 3; i < 6; i++ {
			f := smokeRead(t, br)
			require.Equal(t, `{"n":`+string(rune('0'+i))+`}`, f.data)
		}
		_, err = hubs[1].Publish(ctx, "room", Event{Name: "x", Data: []byte("live")})
		require.NoError(t, err)
		f := smokeRead(t, br)
		require.Equal(t, "live", f.data)
		pi, err := hubs[0].Presence(ctx, "room", 10)
		require.NoError(t, err)
		require.Equal(t, 1, pi.Count)
		t.Log(f.id, hubs[0].Stats(), pi)
		_ = time.Second
	})
}

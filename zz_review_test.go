package redisecho

import (
	"github.com/redis/rueidis"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/stretchr/testify/require"
)

func TestZZResurrect(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		b := newBrowser(t)
		require.Equal(t, 200, b.post(app, "/login?user=victim").code)
		e := echo.New()
		e.Use(app.store.Middleware())
		e.POST("/", func(c echo.Context) error {
			s, _ := GetSession(c)
			require.Equal(t, "victim", s.UserID())
			n, err := s.Store().DestroyUserSessions(context.Background(), "victim")
			require.NoError(t, err)
			require.Equal(t, 1, n)
			require.NoError(t, s.Set("theme", "dark"))
			return c.NoContent(204)
		})
		srv := httptest.NewServer(e)
		defer srv.Close()
		inline := &sessionApp{store: app.store, srv: srv}
		b.setCookie(inline, b.cookie(app))
		rep := b.post(inline, "/")
		t.Logf("code %d setcookie %v", rep.code, rep.header.Values("Set-Cookie"))
		b.setCookie(app, b.cookie(inline))
		var who struct{ User, Handle string }
		require.NoError(t, json.Unmarshal([]byte(b.get(app, "/whoami").body), &who))
		list, _ := app.store.ListUserSessions(context.Background(), "victim")
		t.Logf("after log-out-everywhere: user=%q, listed=%d", who.User, len(list))
	})
}

func TestZZStaleAfterDestroySameInstance(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		ctx := context.Background()
		staleRead, resurrected := 0, 0
		const N = 300
		for i := 0; i < N; i++ {
			b := newBrowser(t)
			require.Equal(t, 200, b.post(app, "/login?user=v").code)
			var who struct{ User, Handle string }
			for range 2 {
				require.NoError(t, json.Unmarshal([]byte(b.get(app, "/whoami").body), &who))
			}
			stolen := b.cookie(app)
			_, err := app.store.DestroyUserSessions(ctx, "v")
			require.NoError(t, err)
			a := newBrowser(t)
			a.setCookie(app, stolen)
			require.NoError(t, json.Unmarshal([]byte(a.get(app, "/whoami").body), &who))
			if who.User == "v" {
				staleRead++
			}
			a2 := newBrowser(t)
			a2.setCookie(app, stolen)
			a2.post(app, "/set?k=x&v=1")
			require.NoError(t, json.Unmarshal([]byte(a2.get(app, "/whoami").body), &who))
			if who.User == "v" {
				resurrected++
			}
		}
		t.Logf("%s: stale whoami after DestroyUserSessions returned: %d/%d; resurrected via write: %d/%d", r.Topology, staleRead, N, resurrected, N)
	})
}

func TestZZIndexPruneRace(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		st := app.store
		ctx := context.Background()
		now := time.Now()
		tok := newToken("")
		abs := now.Add(time.Hour)
		require.Nil(t, st.index(ctx, "u1", tok.handle(), abs, now))
		_, err := st.ListUserSessions(ctx, "u1") // lands between index and write
		require.NoError(t, err)
		set := map[string][]byte{fUser: []byte("u1"), fRemember: []byte("1"), "v:x": []byte(`"1"`)}
		_, err = st.runSave(ctx, st.key(tok), st.key(tok), st.saveArgs("new", now, abs.UnixMilli(), true, set, nil))
		require.NoError(t, err)
		list, _ := st.ListUserSessions(ctx, "u1")
		n, _ := st.DestroyUserSessions(ctx, "u1")
		_, found, _ := st.load(ctx, tok, 0)
		t.Logf("listed=%d destroyed=%d stillLive=%v", len(list), n, found)
	})
}

var _ = http.StatusOK

func TestZZStaleDirect(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		app := newSessionApp(t, r, r.Client(), nil)
		st := app.store
		ctx := context.Background()
		stale := 0
		const N = 2000
		for i := 0; i < N; i++ {
			now := time.Now()
			tok := newToken("")
			abs := now.Add(time.Hour)
			set := map[string][]byte{fUser: []byte("w"), "v:x": []byte(`"1"`)}
			res, err := st.runSave(ctx, st.key(tok), st.key(tok), st.saveArgs("new", now, abs.UnixMilli(), true, set, nil))
			require.NoError(t, err)
			for range 2 {
				_, _, _ = st.load(ctx, tok, res.version)
			}
			_, err = st.runSave(ctx, st.key(tok), st.key(tok), []string{"destroy", "0", "0", "", "0", "0", "0"})
			require.NoError(t, err)
			if _, found, _ := st.load(ctx, tok, res.version); found {
				stale++
			}
		}
		t.Logf("%s: destroyed session still loads on the same instance right after destroy returned: %d/%d", r.Topology, stale, N)
	})
}

func TestZZNoDotCookie(t *testing.T) {
	st, err := NewSessionStore(SessionConfig{Client: standaloneClientForZZ(t), Keys: []string{testKey}})
	require.NoError(t, err)
	v := ""
	for len(v) < 80 {
		v += "a"
	}
	defer func() { t.Logf("recovered: %v", recover()) }()
	t.Logf("verify: %v", st.verify(v))
}

func standaloneClientForZZ(t *testing.T) rueidis.Client {
	return newTestRedis(t, standaloneRedis.name, standaloneRedis.addrs).Client()
}

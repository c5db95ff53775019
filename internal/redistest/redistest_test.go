package redistest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"testing"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

var standaloneRedis, clusterRedis *Topology

func TestMain(m *testing.M) {
	os.Exit(Run(m, func(standalone, cluster *Topology) { standaloneRedis, clusterRedis = standalone, cluster }))
}

func TestURL(t *testing.T) {
	require.Equal(t, "redis://a:1", (&Topology{Addrs: []string{"a:1"}}).URL())
	require.Equal(t, "redis://a:1?addr=b:2&addr=c:3", (&Topology{Addrs: []string{"a:1", "b:2", "c:3"}}).URL())
	for _, tp := range []*Topology{standaloneRedis, clusterRedis} {
		opt, err := rueidis.ParseURL(tp.URL())
		require.NoError(t, err, tp.Name)
		require.Equal(t, tp.Addrs, opt.InitAddress, tp.Name)
	}
}

// TestDeleteKeys: every key under the prefix goes, on every master and over
// several SCAN pages; no other key does.
func TestDeleteKeys(t *testing.T) {
	for _, tp := range []*Topology{standaloneRedis, clusterRedis} {
		t.Run(tp.Name, func(t *testing.T) {
			masters, err := tp.masters()
			require.NoError(t, err)
			require.Len(t, masters, len(tp.Addrs))

			c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: tp.Addrs, DisableCache: true})
			require.NoError(t, err)
			defer c.Close()
			ctx := context.Background()
			var rnd [4]byte
			_, _ = rand.Read(rnd[:])
			base := "redistest:" + hex.EncodeToString(rnd[:]) + ":"
			doomed, kept := base+"doomed:", []string{base + "kept", base + "doomed", base + "doomedx"}
			var cmds rueidis.Commands
			for i := range 1200 {
				cmds = append(cmds, c.B().Set().Key(fmt.Sprint(doomed, i)).Value("v").Build())
			}
			for _, k := range kept {
				cmds = append(cmds, c.B().Set().Key(k).Value("v").Build())
			}
			for _, r := range c.DoMulti(ctx, cmds...) {
				require.NoError(t, r.Error())
			}

			n, err := tp.DeleteKeys(doomed)
			require.NoError(t, err)
			require.Equal(t, 1200, n)
			for _, k := range []string{doomed + "0", doomed + "599", doomed + "1199"} {
				exists, err := c.Do(ctx, c.B().Exists().Key(k).Build()).AsInt64()
				require.NoError(t, err)
				require.Zero(t, exists, k)
			}
			for _, k := range kept {
				exists, err := c.Do(ctx, c.B().Exists().Key(k).Build()).AsInt64()
				require.NoError(t, err)
				require.Equal(t, int64(1), exists, k)
			}
			n, err = tp.DeleteKeys(base)
			require.NoError(t, err)
			require.Equal(t, len(kept), n)
		})
	}
	for _, bad := range []string{"", "a*", "a?", "a[b]", `a\`} {
		_, err := standaloneRedis.DeleteKeys(bad)
		require.Error(t, err, bad)
	}
}

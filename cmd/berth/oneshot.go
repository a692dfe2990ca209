package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/reconcile"
	"github.com/spf13/cobra"
)

func reconcileCmd(g *globalFlags) *cobra.Command {
	b := &backendFlags{}
	var dryRun, cleanup bool
	var output string
	cmd := &cobra.Command{
		Use:   "reconcile",
		Short: "One pass: make the host's NAT rules match Docker, print what changed, exit 0 when in step",
		Long: "reconcile lists Docker once, compares it with berth's NAT rules in the kernel and\n" +
			"applies the difference (unless --dry-run). Relay mappings need the daemon (berth run)\n" +
			"and are shown as skipped. Exit status: 0 when the host matches, 1 on any error.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("--output %q: want text or json", output)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			be, err := b.build(g.log, false)
			if err != nil {
				return err
			}
			if cleanup {
				if be.nat == nil {
					return errors.New(be.opts.Disabled[forward.ModeNAT])
				}
				if dryRun {
					fmt.Println("would remove every chain, jump and rule berth owns (iptables and ip6tables), nothing else")
					return nil
				}
				if err := be.nat.Cleanup(ctx); err != nil {
					return err
				}
				fmt.Println("removed every chain, jump and rule berth owns")
				return nil
			}
			cli, err := dockerClient(g.dockerHost)
			if err != nil {
				return err
			}
			defer cli.Close()
			w, err := b.newWatcher(cli, nil, nil)
			if err != nil {
				return err
			}
			if err := w.ListOnce(ctx); err != nil {
				return err
			}
			opts := be.opts
			opts.Observe = dryRun
			rec := reconcile.New(w, opts)
			plans, _, perr := rec.Plan(ctx)
			syncErr := rec.Sync(ctx)
			rows, sum := rec.Status()
			if output == "json" {
				out := struct {
					Plan     map[forward.Mode]jsonPlan `json:"plan"`
					Applied  bool                      `json:"applied"`
					Mappings []reconcile.Row           `json:"mappings"`
					Summary  reconcile.Summary         `json:"summary"`
				}{Plan: map[forward.Mode]jsonPlan{}, Applied: !dryRun, Mappings: rows, Summary: sum}
				for m, p := range plans {
					out.Plan[m] = toJSONPlan(p)
				}
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				enc.Encode(out)
			} else {
				printPlan(os.Stdout, plans, dryRun)
				if dryRun && be.nat != nil {
					if text := natRules(ctx, be.nat, plans[forward.ModeNAT]); strings.TrimSpace(text) != "" {
						fmt.Println("\nrules berth would write (iptables-restore --noflush):")
						fmt.Print(text)
					}
				}
				fmt.Println()
				printRows(os.Stdout, rows, sum, true)
			}
			if perr != nil || (syncErr != nil && !dryRun) || sum.Errors > 0 {
				return exitError{1}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "show the plan and the exact rules, change nothing")
	cmd.Flags().BoolVar(&cleanup, "cleanup", false, "remove every chain, jump and rule berth owns, and nothing else")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "text or json")
	b.register(cmd.Flags())
	withEnvUsage(cmd.Flags())
	return cmd
}

type jsonPlan struct {
	Add    []string `json:"add"`
	Remove []string `json:"remove"`
}

func toJSONPlan(p reconcile.Plan) jsonPlan {
	out := jsonPlan{Add: []string{}, Remove: []string{}}
	for _, m := range p.Add {
		out.Add = append(out.Add, m.String())
	}
	for _, m := range p.Remove {
		out.Remove = append(out.Remove, m.String())
	}
	return out
}

func printPlan(w io.Writer, plans map[forward.Mode]reconcile.Plan, dryRun bool) {
	verb := map[bool]string{true: "would ", false: ""}[dryRun]
	modes := make([]string, 0, len(plans))
	for m := range plans {
		modes = append(modes, string(m))
	}
	sort.Strings(modes)
	n := 0
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ACTION\tMODE\tMAPPING")
	for _, m := range modes {
		p := plans[forward.Mode(m)]
		for _, x := range p.Remove {
			fmt.Fprintf(tw, "%sremove\t%s\t%s\n", verb, m, x)
			n++
		}
		for _, x := range p.Add {
			fmt.Fprintf(tw, "%sadd\t%s\t%s\n", verb, m, x)
			n++
		}
	}
	if n == 0 {
		fmt.Fprintln(w, "plan: nothing to change, the host is in step")
		return
	}
	tw.Flush()
}

func printRows(w io.Writer, rows []reconcile.Row, sum reconcile.Summary, oneShot bool) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROTO\tHOST\tCONTAINER\tNAME\tSOURCE\tMODE\tSTATE\tTRAFFIC\tERROR")
	for _, r := range rows {
		host, target := "-", "-"
		if r.HostIP != "" {
			host = hostPort(r.HostIP, r.HostPort)
		}
		if r.ContainerIP != "" {
			target = hostPort(r.ContainerIP, r.ContainerPort)
		}
		traffic := "-"
		if s := r.Stats; s != nil {
			if r.Proto == "udp" {
				traffic = fmt.Sprintf("%d flows (%d open) %s/%s", s.Flows, s.ActiveUDP, bytes(s.BytesIn), bytes(s.BytesOut))
			} else {
				traffic = fmt.Sprintf("%d conn (%d open) %s/%s", s.Conns, s.ActiveTCP, bytes(s.BytesIn), bytes(s.BytesOut))
			}
			if d := s.Drops + s.KernelDrops; d > 0 {
				traffic += fmt.Sprintf(" %d dropped", d)
			}
		}
		proto := r.Proto
		if proto == "" {
			proto = "-"
		}
		errText := r.Error
		if errText == "" {
			errText = r.Reason
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", proto, host, target, r.ContainerName,
			r.Source, r.Mode, r.State, traffic, errText)
	}
	tw.Flush()
	fmt.Fprintf(w, "%d mappings: %d installed, %d pending, %d errors, %d skipped, %d forwarded by dockerd", sum.Mappings, sum.Installed, sum.Pending, sum.Errors, sum.Skipped, sum.ByDocker)
	if !oneShot {
		fmt.Fprintf(w, "; %d syncs (%d failed), last %s ago; docker connected: %v; flush recoveries: %d",
			sum.Syncs, sum.FailedSyncs, time.Since(sum.LastSync).Round(time.Millisecond), sum.DockerConnected, sum.FlushRecoveries)
	}
	fmt.Fprintln(w)
	for _, l := range sum.Info {
		fmt.Fprintln(w, l)
	}
}

func hostPort(ip string, port uint16) string {
	if strings.Contains(ip, ":") {
		return fmt.Sprintf("[%s]:%d", ip, port)
	}
	return fmt.Sprintf("%s:%d", ip, port)
}

func bytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}

func statusCmd(g *globalFlags) *cobra.Command {
	b := &backendFlags{}
	var output string
	var summary bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show every mapping: source, mode, state, errors, relay traffic",
		Long: "status asks the running daemon at --http-addr. When none answers it lists Docker and\n" +
			"the kernel itself and shows desired against installed.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("--output %q: want text or json", output)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			rows, sum, live, err := fetchStatus(ctx, g.httpAddr)
			if err != nil {
				rows, sum, err = observe(ctx, g, b)
				if err != nil {
					return err
				}
				if output == "text" {
					fmt.Fprintf(os.Stderr, "no berth daemon answers at %s; showing desired against installed as seen now\n", g.httpAddr)
				}
			}
			if output == "json" {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				if summary {
					return enc.Encode(sum)
				}
				if rows == nil {
					rows = []reconcile.Row{}
				}
				return enc.Encode(rows)
			}
			if summary {
				rows = nil
			}
			printRows(os.Stdout, rows, sum, !live)
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "text or json")
	cmd.Flags().BoolVar(&summary, "summary", false, "only the daemon-wide summary (syncs, counts, recoveries)")
	b.register(cmd.Flags())
	withEnvUsage(cmd.Flags())
	return cmd
}

func fetchStatus(ctx context.Context, addr string) ([]reconcile.Row, reconcile.Summary, bool, error) {
	var rows []reconcile.Row
	var sum reconcile.Summary
	c := &http.Client{Timeout: 10 * time.Second}
	for path, v := range map[string]any{"/status": &rows, "/status/summary": &sum} {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
		resp, err := c.Do(req)
		if err != nil {
			return nil, sum, false, err
		}
		err = json.NewDecoder(resp.Body).Decode(v)
		resp.Body.Close()
		if err != nil {
			return nil, sum, false, fmt.Errorf("%s: %w", path, err)
		}
	}
	return rows, sum, true, nil
}

func observe(ctx context.Context, g *globalFlags, b *backendFlags) ([]reconcile.Row, reconcile.Summary, error) {
	cli, err := dockerClient(g.dockerHost)
	if err != nil {
		return nil, reconcile.Summary{}, err
	}
	defer cli.Close()
	w, err := b.newWatcher(cli, nil, nil)
	if err != nil {
		return nil, reconcile.Summary{}, err
	}
	if err := w.ListOnce(ctx); err != nil {
		return nil, reconcile.Summary{}, err
	}
	be, err := b.build(g.log, false)
	if err != nil {
		return nil, reconcile.Summary{}, err
	}
	opts := be.opts
	opts.Observe = true
	rec := reconcile.New(w, opts)
	rec.SetInfo(be.info...)
	rec.Sync(ctx)
	rows, sum := rec.Status()
	return rows, sum, nil
}

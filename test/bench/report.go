package bench

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// Table renders a Markdown table.
func Table(head []string, rows [][]string) string {
	var b strings.Builder
	b.WriteString("| " + strings.Join(head, " | ") + " |\n|")
	for range head {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, r := range rows {
		b.WriteString("| " + strings.Join(r, " | ") + " |\n")
	}
	return b.String()
}

// Ratio is a/b as "0.93x", or "n/a".
func Ratio(a, b float64) string {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return "n/a"
	}
	if r := a / b; r < 0.1 && r > 0 {
		return fmt.Sprintf("%.3fx (1/%.0f)", r, 1/r)
	}
	return fmt.Sprintf("%.2fx", a/b)
}

// Dur prints a duration rounded for a table.
func Dur(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%d µs", d.Microseconds())
	case d < 10*time.Second:
		return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000)
	default:
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
}

// Series is one line of a chart.
type Series struct {
	Name   string
	Color  string
	Dashed bool
	X, Y   []float64
}

// Panel is one log-log plot.
type Panel struct {
	Title, XLabel, YLabel string
	Series                []Series
}

// SVG draws panels side by side as a standalone SVG document, log-log
// axes with decade gridlines. It needs no plotting library, so the module
// gains no dependency for a chart.
func SVG(title string, panels ...Panel) string {
	const pw, ph, ml, mr, mt, mb = 460.0, 340.0, 70.0, 20.0, 50.0, 110.0
	W := pw * float64(len(panels))
	H := ph
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", W, H, W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="20" text-anchor="middle" font-size="15" font-weight="bold">%s</text>`+"\n", W/2, esc(title))
	for i, p := range panels {
		ox := float64(i) * pw
		x0, x1 := ox+ml, ox+pw-mr
		y0, y1 := ph-mb, mt // bottom, top (pixels)
		lx0, lx1, ly0, ly1 := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
		for _, s := range p.Series {
			for j := range s.X {
				if s.X[j] <= 0 || s.Y[j] <= 0 {
					continue
				}
				lx0, lx1 = math.Min(lx0, math.Log10(s.X[j])), math.Max(lx1, math.Log10(s.X[j]))
				ly0, ly1 = math.Min(ly0, math.Log10(s.Y[j])), math.Max(ly1, math.Log10(s.Y[j]))
			}
		}
		if math.IsInf(lx0, 0) {
			continue
		}
		lx0, lx1 = math.Floor(lx0), math.Ceil(lx1)
		ly0, ly1 = math.Floor(ly0), math.Ceil(ly1)
		if lx1 == lx0 {
			lx1++
		}
		if ly1 == ly0 {
			ly1++
		}
		px := func(v float64) float64 { return x0 + (math.Log10(v)-lx0)/(lx1-lx0)*(x1-x0) }
		py := func(v float64) float64 { return y0 - (math.Log10(v)-ly0)/(ly1-ly0)*(y0-y1) }
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="middle" font-weight="bold">%s</text>`+"\n", (x0+x1)/2, y1-10, esc(p.Title))
		for d := lx0; d <= lx1; d++ {
			x := px(math.Pow(10, d))
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x, y0, x, y1)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x, y0+16, tick(math.Pow(10, d)))
		}
		for d := ly0; d <= ly1; d++ {
			y := py(math.Pow(10, d))
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x0, y, x1, y)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%s</text>`+"\n", x0-6, y+4, tick(math.Pow(10, d)))
		}
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#333"/>`+"\n", x0, y1, x1-x0, y0-y1)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", (x0+x1)/2, y0+34, esc(p.XLabel))
		fmt.Fprintf(&b, `<text transform="translate(%.1f %.1f) rotate(-90)" text-anchor="middle">%s</text>`+"\n", ox+16, (y0+y1)/2, esc(p.YLabel))
		for k, s := range p.Series {
			var pts []string
			for j := range s.X {
				if s.X[j] > 0 && s.Y[j] > 0 {
					pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(s.X[j]), py(s.Y[j])))
				}
			}
			dash := ""
			if s.Dashed {
				dash = ` stroke-dasharray="6 4"`
			}
			fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"%s/>`+"\n", strings.Join(pts, " "), s.Color, dash)
			for _, pt := range pts {
				xy := strings.Split(pt, ",")
				fmt.Fprintf(&b, `<circle cx="%s" cy="%s" r="3" fill="%s"/>`+"\n", xy[0], xy[1], s.Color)
			}
			ly := y0 + 52 + float64(k)*16
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"%s/>`+"\n", x0, ly-4, x0+24, ly-4, s.Color, dash)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f">%s</text>`+"\n", x0+30, ly, esc(s.Name))
		}
	}
	b.WriteString("</svg>\n")
	return b.String()
}

func tick(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%gM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%gk", v/1e3)
	default:
		return fmt.Sprintf("%g", v)
	}
}

func esc(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}

package main

import (
	"bytes"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"strings"
)

// Chart geometry in pixels.
const (
	panelW, panelH = 330, 330
	chartCols      = 4
	headerH        = 70
	chartMargin    = 10
)

// targetColor is a setup's colour in the chart.
func targetColor(name string) color.RGBA {
	switch name {
	case usher:
		return color.RGBA{31, 119, 180, 255}
	case dovecotD:
		return color.RGBA{230, 126, 14, 255}
	}
	return color.RGBA{140, 140, 140, 255}
}

// bar is one setup's value in a panel; min and max draw a whisker when
// they differ from the value.
type bar struct {
	target        string
	v, min, max   float64
	whisker, have bool
}

// panel is one small bar chart.
type panel struct {
	title string
	bars  []bar
}

// panels picks what the chart shows from the summary: logins/s and p99
// latency first, then the rest that was measured.
func (r *report) panels() []panel {
	type spec struct {
		workload, title string
		value           func(*Stat) (v, lo, hi float64, whisker bool)
		proxiesOnly     bool
	}
	metric := func(s *Stat) (float64, float64, float64, bool) { return s.Metric, s.Min, s.Max, true }
	p99 := func(s *Stat) (float64, float64, float64, bool) { return s.P99, s.P99, s.P99, false }
	cpu := func(s *Stat) (float64, float64, float64, bool) { return s.ProxyCPU, s.ProxyCPU, s.ProxyCPU, false }
	specs := []spec{
		{"imap-login", "IMAP logins/s", metric, false},
		{"imap-login", "IMAP login p99 ms", p99, false},
		{"pop3-login", "POP3 logins/s", metric, false},
		{"pop3-login", "POP3 login p99 ms", p99, false},
		{"imap-login", "CPU ms/1000 IMAP logins", cpu, true},
		{"fetch", "Fetch MB/s", metric, false},
		{"lmtp", "LMTP deliveries/s", metric, false},
		{"idle", "KiB per idle session", metric, true},
	}
	var out []panel
	for _, s := range specs {
		p := panel{title: s.title}
		any := false
		for _, t := range []string{direct, usher, dovecotD} {
			b := bar{target: t}
			if st := r.stat(s.workload, t); st != nil && !(s.proxiesOnly && t == direct) {
				b.v, b.min, b.max, b.whisker = s.value(st)
				b.have, any = true, true
			}
			p.bars = append(p.bars, b)
		}
		if any {
			out = append(out, p)
		}
	}
	return out
}

// canvas is an image with the chart's font and colours.
type canvas struct {
	img           *image.RGBA
	font          map[rune]glyph
	bg, ink, grid color.RGBA
}

func newCanvas(w, h int) *canvas {
	return &canvas{
		img: image.NewRGBA(image.Rect(0, 0, w, h)), font: parseFont(),
		bg: color.RGBA{255, 255, 255, 255}, ink: color.RGBA{30, 30, 30, 255}, grid: color.RGBA{215, 215, 215, 255},
	}
}

func (c *canvas) fill(x0, y0, x1, y1 int, col color.RGBA) {
	r := image.Rect(x0, y0, x1, y1).Intersect(c.img.Bounds())
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			c.img.SetRGBA(x, y, col)
		}
	}
}

// textWidth is the width of s drawn at scale.
func textWidth(s string, scale int) int {
	n := len([]rune(s))
	if n == 0 {
		return 0
	}
	return (n*glyphAdvance - 1) * scale
}

// text draws s with its top left corner at (x, y); characters the font
// lacks are drawn as '?'.
func (c *canvas) text(x, y, scale int, col color.RGBA, s string) {
	for _, r := range strings.ToUpper(s) {
		if r != ' ' {
			g, ok := c.font[r]
			if !ok {
				g = c.font['?']
			}
			for gy := range glyphH {
				for gx := range glyphW {
					if g[gy][gx] {
						c.fill(x+gx*scale, y+gy*scale, x+(gx+1)*scale, y+(gy+1)*scale, col)
					}
				}
			}
		}
		x += glyphAdvance * scale
	}
}

// centered draws s centred on x.
func (c *canvas) centered(x, y, scale int, col color.RGBA, s string) {
	c.text(x-textWidth(s, scale)/2, y, scale, col, s)
}

// niceMax rounds v up to 1, 2 or 5 times a power of ten.
func niceMax(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

// drawPanel draws p with its top left corner at (x0, y0).
func (c *canvas) drawPanel(p panel, x0, y0 int) {
	c.centered(x0+panelW/2, y0+8, 2, c.ink, p.title)
	top, bottom := y0+60, y0+panelH-50
	left, right := x0+20, x0+panelW-20
	var hi float64
	for _, b := range p.bars {
		if b.have {
			hi = math.Max(hi, math.Max(b.v, b.max))
		}
	}
	scaleMax := niceMax(hi * 1.05)
	// Grid lines at quarters of the scale.
	for i := 1; i <= 4; i++ {
		y := bottom - (bottom-top)*i/4
		c.fill(left, y, right, y+1, c.grid)
	}
	c.text(left, top-14, 1, c.ink, num(scaleMax))
	c.fill(left, bottom, right, bottom+2, c.ink)
	slot := (right - left) / len(p.bars)
	yOf := func(v float64) int { return bottom - int(math.Round(v/scaleMax*float64(bottom-top))) }
	for i, b := range p.bars {
		cx := left + slot*i + slot/2
		c.centered(cx, bottom+10, 2, c.ink, b.target)
		if !b.have {
			c.centered(cx, bottom-22, 2, c.grid, "N/A")
			continue
		}
		w := slot * 3 / 5
		c.fill(cx-w/2, yOf(b.v), cx+w/2, bottom, targetColor(b.target))
		label := num(b.v)
		labelY := yOf(b.v) - 20
		if b.whisker && b.max > b.min {
			c.fill(cx-1, yOf(b.max), cx+2, yOf(b.min)+1, c.ink)
			c.fill(cx-6, yOf(b.max), cx+7, yOf(b.max)+2, c.ink)
			c.fill(cx-6, yOf(b.min)-1, cx+7, yOf(b.min)+1, c.ink)
			labelY = min(labelY, yOf(b.max)-20)
		}
		c.centered(cx, max(labelY, top-2), 2, c.ink, label)
	}
}

// chart renders the PNG.
func (r *report) chart() ([]byte, error) {
	ps := r.panels()
	if len(ps) == 0 {
		return nil, fmt.Errorf("chart: no measurements")
	}
	cols := min(chartCols, len(ps))
	rows := (len(ps) + cols - 1) / cols
	w, h := cols*panelW+2*chartMargin, headerH+rows*panelH+chartMargin
	c := newCanvas(w, h)
	c.fill(0, 0, w, h, c.bg)
	c.text(chartMargin+10, 12, 3, c.ink, "usher vs Dovecot director vs direct")
	sub := fmt.Sprintf("medians of %s rounds x %s, %d CPUs, %s", r.Options["rounds"], r.Options["duration"],
		r.Machine.CPUs, r.Started.Format("2006-01-02"))
	c.text(chartMargin+10, 44, 2, c.ink, sub)
	lx := w - chartMargin - 10
	for _, t := range []string{dovecotD, usher, direct} {
		lw := textWidth(targetLabel(t), 2)
		lx -= lw
		c.text(lx, 44, 2, c.ink, targetLabel(t))
		lx -= 20
		c.fill(lx, 44, lx+14, 58, targetColor(t))
		lx -= 24
	}
	for i, p := range ps {
		x0 := chartMargin + (i%cols)*panelW
		y0 := headerH + (i/cols)*panelH
		c.drawPanel(p, x0, y0)
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, c.img); err != nil {
		return nil, fmt.Errorf("chart: %w", err)
	}
	return buf.Bytes(), nil
}

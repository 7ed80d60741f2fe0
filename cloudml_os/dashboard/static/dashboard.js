// Draws the dashboard's charts (Chart.js) from each <canvas data-chart="{...}">, also in fragments htmx swaps in.
(function () {
  "use strict";
  const palette = ["#0d6efd", "#dc3545", "#198754", "#fd7e14", "#6f42c1", "#20c997", "#6c757d"];

  function usage(spec) {
    return {
      type: "bar",
      data: {
        labels: spec.data.labels,
        datasets: [
          { label: "used", data: spec.data.usage, backgroundColor: "#0d6efd" },
          { label: "quota", data: spec.data.quota, backgroundColor: "#adb5bd" },
        ],
      },
      options: { animation: false, scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } },
    };
  }

  function metrics(spec) {
    const datasets = Object.entries(spec.series).map(([name, points], i) => ({
      label: name, data: points, borderColor: palette[i % palette.length], showLine: true, pointRadius: 2,
    }));
    return {
      type: "scatter", data: { datasets },
      options: { animation: false, scales: { x: { title: { display: true, text: "step" } } } },
    };
  }

  function health(spec) {
    // REPLICA is a replica becoming ready; the failover kinds are the serving workflow's event kinds.
    const colours = { REPLICA: "#198754", EJECTED: "#dc3545", REPLACING: "#fd7e14", REPLACED: "#6f42c1",
                      FAILOVER_LIMIT: "#000000", ERROR: "#dc3545", DELETED: "#6c757d", SCALE: "#0dcaf0" };
    const datasets = Object.entries(spec.series).map(([kind, points], i) => ({
      label: kind, data: points, pointRadius: 6,
      backgroundColor: colours[kind] || palette[i % palette.length],
    }));
    return {
      type: "scatter", data: { datasets },
      options: {
        animation: false,
        scales: {
          x: { title: { display: true, text: "seconds" }, beginAtZero: true },
          y: { min: -1, max: spec.rows.length, reverse: true,
               ticks: { stepSize: 1, callback: (v) => spec.rows[v] ?? "" } },
        },
        plugins: { tooltip: { callbacks: { label: (item) => item.raw.label } } },
      },
    };
  }

  function replicas(spec) {
    // The count asked for over time (a step line), with the autoscaler's decisions and quota stops on it.
    const colours = { AUTOSCALE: "#0d6efd", QUOTA: "#dc3545" };
    const datasets = [{ label: "replicas", data: spec.count, stepped: "before", showLine: true, pointRadius: 0,
                        borderColor: "#6c757d" }];
    Object.entries(spec.marks).forEach(([kind, points]) => datasets.push(
      { label: kind, data: points, pointRadius: 6, backgroundColor: colours[kind] }));
    return {
      type: "scatter", data: { datasets },
      options: {
        animation: false,
        scales: { x: { title: { display: true, text: "seconds" }, beginAtZero: true },
                  y: { beginAtZero: true, ticks: { stepSize: 1, precision: 0 } } },
        plugins: { tooltip: { callbacks: { label: (item) => item.raw.label ?? `${item.raw.y} replicas` } } },
      },
    };
  }

  function probes(spec) {
    // The monitor's samples: one line per series (replica, or replica and statistic), minutes before now.
    const datasets = Object.entries(spec.series).map(([name, points], i) => ({
      label: name, data: points, showLine: true, borderWidth: 1.5,
      pointRadius: points.map((p) => (p.healthy === false ? 5 : 2)),
      borderColor: palette[Math.floor(i / (spec.unit === "ms" ? 2 : 1)) % palette.length],
      borderDash: name.endsWith(" max") ? [4, 3] : [],
      pointBackgroundColor: points.map((p) => (p.healthy === false ? "#dc3545" : undefined)),
    }));
    return {
      type: "scatter", data: { datasets },
      options: {
        animation: false,
        scales: {
          x: { title: { display: true, text: "minutes (0 = now)" } },
          y: spec.unit === "%" ? { min: 0, max: 100, title: { display: true, text: "%" } }
            : { beginAtZero: true, title: { display: true, text: "ms" } },
        },
      },
    };
  }

  // A tuning job's trials (views.tuning_view): the best trial's point larger and green, a trial stopped early
  // hollow and orange.
  const trialPoint = (p) => (p.best ? 7 : 4);
  const trialColour = (p) => (p.best ? "#198754" : p.stoppedEarly ? "#fd7e14" : "#0d6efd");
  const trialFill = (p) => (p.stoppedEarly ? "#ffffff" : trialColour(p));
  const trialTooltip = { callbacks: { label: (item) =>
    `trial ${item.raw.trial}${item.raw.stoppedEarly ? " (stopped early)" : ""}: ${item.raw.y}` } };

  function trials(spec) {
    // Each trial's final objective, and the best of the trials up to it (by the job's goal); a trial's width
    // of room on either side, ticks only at the trials' numbers.
    const numbers = spec.points.map((p) => p.x);
    const [first, last] = [Math.min(...numbers), Math.max(...numbers)];
    return {
      type: "scatter",
      data: {
        datasets: [
          { label: spec.metric, data: spec.points, pointRadius: spec.points.map(trialPoint),
            backgroundColor: spec.points.map(trialFill), borderColor: spec.points.map(trialColour) },
          { label: "best so far", data: spec.bestSoFar, showLine: true, stepped: "after", pointRadius: 0,
            borderColor: "#fd7e14", backgroundColor: "#fd7e14", borderDash: [4, 3] },
        ],
      },
      options: {
        animation: false,
        scales: {
          x: { title: { display: true, text: "trial" }, min: first - 1, max: last + 1,
               ticks: { stepSize: 1, precision: 0, callback: (v) => (v >= first && v <= last ? v : "") } },
          y: { title: { display: true, text: spec.metric } },
        },
        plugins: { tooltip: trialTooltip },
      },
    };
  }

  function parameter(spec) {
    // One parameter's value against the objective: a linear or log axis for numbers, categories otherwise.
    const x = { type: spec.axis, title: { display: true, text: spec.name } };
    if (spec.axis === "category") {
      x.labels = spec.labels;
      x.offset = true;
    }
    return {
      type: "scatter",
      data: {
        datasets: [{ label: spec.metric, data: spec.points, pointRadius: spec.points.map(trialPoint),
                     backgroundColor: spec.points.map(trialFill), borderColor: spec.points.map(trialColour) }],
      },
      options: {
        animation: false,
        scales: { x, y: { title: { display: true, text: spec.metric } } },
        plugins: { legend: { display: false }, tooltip: trialTooltip },
      },
    };
  }

  const builders = { usage, metrics, health, replicas, probes, trials, parameter };

  function draw(root) {
    root.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
      if (canvas.dataset.drawn) return;
      const spec = JSON.parse(canvas.dataset.chart);
      new Chart(canvas, builders[spec.type](spec));
      canvas.dataset.drawn = "1";
    });
  }

  // Polled tables hold forms: skip a refresh while the user has ticked a row or is typing in one.
  window.dashboardIdle = function () {
    const active = document.activeElement;
    return !document.querySelector("tbody input[type=checkbox]:checked") &&
      !(active && active.tagName === "INPUT" && active.closest("tbody"));
  };

  document.addEventListener("DOMContentLoaded", () => {
    htmx.onLoad(draw);
    // A polled fragment's canvases are replaced by new ones: free the charts drawn on the old.
    document.addEventListener("htmx:beforeCleanupElement", (event) => {
      if (event.target.tagName === "CANVAS") Chart.getChart(event.target)?.destroy();
    });
    // A chart drawn in a hidden tab has no size; give it one when its tab is shown.
    document.addEventListener("shown.bs.tab", (event) => {
      const pane = document.querySelector(event.target.dataset.bsTarget);
      pane?.querySelectorAll("canvas[data-chart]").forEach((canvas) => Chart.getChart(canvas)?.resize());
    });
  });
})();

"""Reports: Table 2 and Table 1 layouts (Markdown, CSV) with the paper's numbers, stale records, grids, curves."""

import csv
import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from PIL import Image

from stylegan2ada.networks import Generator
from stylegan2ada.pickles import save_network_pkl
from taxogan_ext import hierarchy, report
from training_helpers import write_zip

TAXON = 'taxon:/models/taxon.pt'


def _record(stage, taxon, method, source=None, fid=10.0, kid=0.01, detector=TAXON, **extra):
    fid_name, kid_name = ('fid50k_full', 'kid50k_full') if detector == 'inception' else ('fid1k_full_taxon', 'kid1k_full_taxon')
    record = dict(stage=stage, taxon=taxon, method=method, source=source, origin=None, chain=[taxon], num_images=len(taxon),
                  kimg=1.0, fingerprint='f-' + stage, detector=detector, metrics={fid_name: fid, kid_name: kid},
                  date='2026-01-02T03:04:05+00:00', host='box', train_seconds=60.0)
    record.update(extra)
    return record


def _write(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / hierarchy.RESULTS_FILE, 'w') as f:
        for record in records:
            f.write(json.dumps(record) + '\n')


def _table2_records(detector=TAXON):
    return [
        _record('Calanoida', 'Calanoida', 'direct', fid=40.0, kid=0.0123, detector=detector),
        _record('Cyclopoida', 'Cyclopoida', 'direct', fid=99.0, kid=0.5, detector=detector),    # superseded below
        _record('Cyclopoida', 'Cyclopoida', 'direct', fid=61.5, kid=0.02, detector=detector),
        _record('Calanoida__Cyclopoida', 'Cyclopoida', 'lateral', 'Calanoida', fid=51.25, kid=0.015, detector=detector),
        _record('Copepoda', 'Copepoda', 'direct', fid=30.0, kid=0.009, detector=detector),
        _record('Copepoda__Calanoida', 'Calanoida', 'descending', 'Copepoda', fid=37.0, kid=0.0095, detector=detector),
        _record('Copepoda__Cyclopoida', 'Cyclopoida', 'descending', 'Copepoda', fid=47.5, kid=0.012, detector=detector),
    ]


def _rows(markdown):
    return {line.split(' | ')[0].strip('| '): [c.strip() for c in line.strip('|').split('|')]
            for line in markdown.splitlines() if line.startswith('| ') and not line.startswith('| taxon')}


def test_table2_layout_latest_records_and_paper_columns(tmp_path):
    _write(tmp_path, _table2_records())
    records = report.current_records(tmp_path)
    assert len(records) == 6                                    # the older Cyclopoida direct line is replaced
    md = report.hier_markdown(records)
    header = next(line for line in md.splitlines() if line.startswith('| taxon'))
    assert header == ('| taxon | images | direct | direct: paper (Inception) | lateral (from Calanoida) | '
                      'lateral (from Calanoida): paper (Inception) | descending (from Copepoda) | '
                      'descending (from Copepoda): paper (Inception) |')
    rows = _rows(md)
    # FID with 3 decimals, KID x 100; the paper's (Inception) values in their own columns.
    assert rows['Calanoida'] == ['Calanoida', '9', '40.000 / 1.230', '39.341 / 1.204', '-', '-', '37.000 / 0.950', '36.529 / 0.931']
    assert rows['Cyclopoida'] == ['Cyclopoida', '10', '61.500 / 2.000', '60.401 / 2.327', '51.250 / 1.500', '50.504 / 1.545',
                                  '47.500 / 1.200', '47.017 / 1.215']
    assert rows['Copepoda'][:3] == ['Copepoda', '8', '30.000 / 0.900'] and rows['Copepoda'][3] == '-'
    assert list(rows) == ['Calanoida', 'Cyclopoida', 'Copepoda']      # no manifest: order of appearance
    assert 'taxon classifier (taxon.pt)' in md and 'NOT comparable' in md
    assert 'Evaluated 2026-01-02 on box' in md

    csv_rows = list(csv.DictReader(report._csv_text(report.CSV_FIELDS, report.hier_csv_rows(records)).splitlines()))
    lateral = next(r for r in csv_rows if r['method'] == 'lateral')
    assert (lateral['taxon'], lateral['source'], float(lateral['fid']), float(lateral['kid_x100'])) == \
        ('Cyclopoida', 'Calanoida', 51.25, 1.5)
    assert (float(lateral['paper_fid_inception']), float(lateral['paper_kid_x100_inception'])) == (50.504, 1.545)
    assert next(r for r in csv_rows if r['taxon'] == 'Copepoda')['paper_fid_inception'] == ''


def test_inception_note_and_non_paper_sources(tmp_path):
    records = _table2_records(detector='inception')
    md = report.hier_markdown(records)
    assert 'NOT comparable' not in md and 'fid50k_full' in md and 'detector: Inception' in md
    # A lateral column from another donor is not the paper's: no paper column beside it.
    other = [_record('Cyclopoida__Calanoida', 'Calanoida', 'lateral', 'Cyclopoida')]
    t = report.hier_table(other)
    assert t['paper_columns'] == set() and report.paper_reference(('lateral', 'Cyclopoida', None), 'Calanoida') is None
    assert report.paper_reference(('descending', 'Copepoda', None), 'Harpacticoida') == (108.533, 1.503)


def test_stale_records_are_left_out(tmp_path):
    records = _table2_records()
    _write(tmp_path, records)
    hierarchy.write_json_atomic(tmp_path / 'Copepoda__Calanoida' / hierarchy.STAGE_FILE, dict(fingerprint='f-retrained'))
    hierarchy.write_json_atomic(tmp_path / 'Copepoda' / hierarchy.STAGE_FILE, dict(fingerprint='f-Copepoda'))
    stages = {r['stage'] for r in report.current_records(tmp_path)}
    assert 'Copepoda__Calanoida' not in stages and 'Copepoda' in stages
    with pytest.raises(report.ReportError, match='no such file'):
        report.current_records(tmp_path / 'nothing')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / hierarchy.RESULTS_FILE).write_text('{"stage": "a", "taxon": "b"}\nnot json\n')
    with pytest.raises(report.ReportError, match=r'results.jsonl:2: not valid JSON'):
        report.current_records(tmp_path / 'bad')


def test_table1_layout(tmp_path):
    configs = {'dcgan': dict(model='dcgan'), 'stylegan2': dict(aug='noaug'), 'ada': {}, 'ada-lecam': dict(lecam_weight=0.0001)}
    fids = {'dcgan': 200.0, 'stylegan2': 120.0, 'ada': 50.0, 'ada-lecam': 45.0}
    for name, options in configs.items():
        record = _record('Calanoida', 'Calanoida', 'direct', fid=fids[name], kid=fids[name] / 1e4, train_options=options)
        _write(tmp_path / name, [record])
    items = report.table1_records(tmp_path)
    assert [name for name, _ in items] == ['DCGAN', 'StyleGAN2', 'StyleGAN2 + ADA', 'StyleGAN2 + ADA + LeCam']
    rows = _rows(report.table1_markdown(items))
    assert rows['DCGAN'] == ['DCGAN', '9', '1', '200.000', '2.000', '239.240']
    assert rows['StyleGAN2 + ADA + LeCam'] == ['StyleGAN2 + ADA + LeCam', '9', '1', '45.000', '0.450', '39.341']
    assert 'training time of these stages 4.0 min' in report.table1_markdown(items)   # four stages called Calanoida, 60 s each
    csv_rows = list(csv.DictReader(report._csv_text(report.TABLE1_CSV_FIELDS, report.table1_csv_rows(items)).splitlines()))
    assert [(r['configuration'], float(r['fid']), float(r['paper_fid50k_inception'])) for r in csv_rows] == [
        ('DCGAN', 200.0, 239.24), ('StyleGAN2', 120.0, 137.426), ('StyleGAN2 + ADA', 50.0, 44.774),
        ('StyleGAN2 + ADA + LeCam', 45.0, 39.341)]
    assert report.table1_configuration(dict(aug='fixed', lecam_weight=1e-3)) == 'StyleGAN2 + fixed augmentation + LeCam'


def check_figure_files(chart, png):
    """The chart's PNG, PDF and SVG files exist beside `png` and are valid: PIL opens the PNG, the PDF starts with %PDF,
    the SVG parses as XML with an <svg> root."""
    png = Path(png)
    assert chart.paths == [str(png.with_suffix(f'.{fmt}')) for fmt in ('png', 'pdf', 'svg')]
    with Image.open(png) as image:
        image.verify()
        assert image.format == 'PNG' and min(image.size) > 100
    assert png.with_suffix('.pdf').read_bytes().startswith(b'%PDF-')
    assert ElementTree.parse(png.with_suffix('.svg')).getroot().tag == '{http://www.w3.org/2000/svg}svg'
    assert not [p.name for p in png.parent.iterdir() if p.name.startswith('.tmp')]     # written through renames


def test_curves_plot_the_stats_and_metric_values(tmp_path):
    stages = []
    for n, name in enumerate(['Copepoda', 'Copepoda__Calanoida']):
        stage = tmp_path / name
        stage.mkdir()
        stats = [{'Progress/kimg': k + n, 'Progress/augment': p * (n + 1), 'Loss/G/loss': {'num': 4, 'mean': 1.5, 'std': 0.1},
                  'timestamp': t} for k, p, t in [(0.0, 0.0, 10), (0.5, 0.1, 20), (1.0, 0.2, 30)]]
        (stage / 'stats.jsonl').write_text(''.join(json.dumps(s) + '\n' for s in stats))
        # A snapshot metric is written just before its tick's stats line; the final evaluation after the last one.
        metric = [{'results': {'fid1k_full': v - 10 * n}, 'timestamp': t} for v, t in [(80.0, 19), (60.0, 29), (55.0, 40)]]
        (stage / 'metric-fid1k_full.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in metric) + '{"cut')
        stages.append((name, str(stage), 'fid1k_full'))
    stages.append(('no statistics', str(tmp_path / 'missing'), 'fid1k_full'))          # left out of the chart
    curves = report.stage_curves(tmp_path / 'Copepoda', 'fid1k_full')
    assert curves == dict(augment=[(0.0, 0.0), (0.5, 0.1), (1.0, 0.2)], fid=[(0.5, 80.0), (1.0, 55.0), (1.0, 60.0)])

    chart = report.write_curves(tmp_path, stages)
    check_figure_files(chart, tmp_path / 'curves.png')
    plotted = {(s['panel'], s['label']): s for s in chart.series}
    assert sorted(plotted) == [('augment', 'Copepoda'), ('augment', 'Copepoda__Calanoida'),
                               ('fid', 'Copepoda'), ('fid', 'Copepoda__Calanoida')]
    for name, _, _ in stages[:2]:
        stats = [json.loads(line) for line in (tmp_path / name / 'stats.jsonl').read_text().splitlines()]
        augment = plotted[('augment', name)]
        assert augment['x'] == [s['Progress/kimg'] for s in stats] and augment['y'] == [s['Progress/augment'] for s in stats]
        # Each FID value at the kimg of the first tick written after it (the last tick for the final evaluation).
        values = [json.loads(line)['results']['fid1k_full'] for line in (tmp_path / name / 'metric-fid1k_full.jsonl')
                  .read_text().splitlines()[:3]]
        kimg = [s['Progress/kimg'] for s in stats]
        assert sorted(zip(plotted[('fid', name)]['x'], plotted[('fid', name)]['y'])) == \
            sorted(zip([kimg[1], kimg[2], kimg[2]], values))
    # The same data give the same files, byte for byte (no dates, no random SVG ids).
    before = {p: Path(p).read_bytes() for p in chart.paths}
    again = report.write_curves(tmp_path, stages, formats=('pdf', 'svg', 'png'))
    assert {p: Path(p).read_bytes() for p in again.paths} == before
    assert report.write_curves(tmp_path, stages[2:]) is None


def _gain_record(method, per_taxon, value, interval, seeds=3):
    return dict(method=method, metric='gain_taxon', targets=list(per_taxon), per_taxon=per_taxon, value=value,
                interval=interval, seeds=seeds)


def test_gain_chart_plots_each_methods_gains_and_intervals(tmp_path):
    nan = float('nan')
    records = [
        _gain_record('descending', {'Calanoida': [0.25, 0.05, 0.45], 'Cyclopoida': [-0.125, -1.4, 1.2]}, 0.0625, [-0.5, 0.625]),
        _gain_record('direct', {'Calanoida': [0.5, nan, nan], 'Cyclopoida': [-0.25, -0.3, -0.2]}, 0.125, [nan, nan], seeds=1),
        dict(method='lateral', metric='gain_taxon', error='no held-out images'),        # not measured: no bars
        dict(method='direct', metric='cas_taxon', targets=['Calanoida', 'Cyclopoida']),  # not a gain
    ]
    chart = report.write_gain_chart(records, tmp_path / 'gain.png')
    check_figure_files(chart, tmp_path / 'gain.png')
    # Methods in the tables' order, one series each: the taxa, then the balanced mean, with the records' values.
    assert [s['label'] for s in chart.series] == ['direct', 'descending']
    groups = ['Calanoida', 'Cyclopoida', report.BALANCED]
    for item, record in zip(chart.series, [records[1], records[0]]):
        assert item['x'] == groups
        triples = [record['per_taxon'][t] for t in groups[:2]] + [[record['value']] + record['interval']]
        for key, column in (('y', 0), ('low', 1), ('high', 2)):
            np.testing.assert_array_equal(item[key], [t[column] for t in triples])
    assert report.write_gain_chart(records[2:], tmp_path / 'none.png') is None and not (tmp_path / 'none.png').exists()


def test_grids_show_real_then_generated_rows(tmp_path):
    data = write_zip(tmp_path / 'Harpacticoida.zip', num_images=5, resolution=16)
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=64, channel_max=8))
    save_network_pkl(tmp_path / 'net.pkl', dict(G=G, G_ema=G))
    record = dict(taxon='Harpacticoida', pkl='net.pkl', data=data, num_images=5)
    written = report.write_grids(tmp_path, {'Harpacticoida': [('direct', record), ('descending (from Copepoda)', record)]}, num=4)
    assert [p.split('/')[-1] for p in written] == ['grid-Harpacticoida.png', 'overview.png']
    grid = Image.open(written[0]).convert('RGB')
    # 16 px images are shown at 64 px: 3 rows (real, two methods) of 4, 2 px gaps, a 24 px title band.
    label_w = grid.size[0] - 4 * 66 - 2
    assert grid.size[1] == 24 + 3 * 66 + 2 and label_w > 0
    real = report.real_images(data, 4)
    fake = report.generated_images(str(tmp_path / 'net.pkl'), data, 4)
    for row, images in [(0, real), (1, fake), (2, fake)]:
        for col in range(4):
            x, y = label_w + 2 + col * 66, 24 + 2 + row * 66
            expected = np.asarray(report._to_rgb_image(images[col], 64))
            assert np.array_equal(np.asarray(grid.crop((x, y, x + 64, y + 64))), expected), (row, col)
    # The generator draws z from seeds 0..3 as generate.py does.
    z = torch.from_numpy(np.random.RandomState(2).randn(8)).float()[None]
    with torch.no_grad():
        img = (G(z, torch.zeros([1, 0]), noise_mode='const') * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    assert np.array_equal(fake[2], img[0].numpy())


def test_knn_metrics_in_the_table_and_csv(tmp_path):
    records = _table2_records()
    records[0]['metrics'].update(pr1k3_full_taxon_precision=0.8125, pr1k3_full_taxon_recall=0.25,
                                 mem1k_taxon_share=0.5, mem1k_taxon_ct=-4.25)
    records[3]['metrics'].update(dc1k_full_taxon_density=1.0625, dc1k_full_taxon_coverage=0.75)
    _write(tmp_path, records)
    current = report.current_records(tmp_path)
    md = report.hier_markdown(current)
    section = md.split('Fidelity, diversity and copying (')[1]
    assert section.startswith('dc1k_full_taxon_coverage, dc1k_full_taxon_density, mem1k_taxon_ct, mem1k_taxon_share, '
                              'pr1k3_full_taxon_precision, pr1k3_full_taxon_recall)')
    rows = _rows(section)
    assert rows['Calanoida'][1:] == ['P 0.812 R 0.250 · copies 0.500 (C_T -4.25)', '-', '-']
    assert rows['Cyclopoida'][1:] == ['-', 'D 1.062 C 0.750', '-']
    csv_rows = list(csv.DictReader(report._csv_text(report.CSV_FIELDS, report.hier_csv_rows(current)).splitlines()))
    cal = next(r for r in csv_rows if r['taxon'] == 'Calanoida' and r['method'] == 'direct')
    assert (cal['precision'], cal['recall'], cal['copy_share'], cal['copy_ct'], cal['density']) == ('0.8125', '0.25', '0.5', '-4.25', '')
    # Without k-NN results there is no such section.
    _write(tmp_path / 'plain', _table2_records())
    assert 'Fidelity, diversity' not in report.hier_markdown(report.current_records(tmp_path / 'plain'))


def test_closest_pairs_find_copies_of_training_images(tmp_path):
    from test_metrics import TinyDetector, _write_dataset
    from stylegan2ada.metrics.detectors import resolve_detector
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=64, channel_max=8))
    save_network_pkl(tmp_path / 'net.pkl', dict(G=G, G_ema=G))
    fake = report.generated_images(str(tmp_path / 'net.pkl'), None, 8)
    # The training set holds exact copies of generated images 5 and 2 among random images.
    others = np.random.RandomState(0).randint(0, 256, [6, 3, 16, 16]).astype(np.uint8)
    data = _write_dataset(tmp_path / 'Calanoida.zip', np.concatenate([others[:3], fake[[5]], others[3:], fake[[2]]]))
    torch.jit.save(torch.jit.script(TinyDetector()), str(tmp_path / 'det.pt'))
    detector = resolve_detector(str(tmp_path / 'det.pt'))
    found = report.closest_pairs(str(tmp_path / 'net.pkl'), data, detector, num=8, pairs=3)
    assert sorted(d for _, _, d in found[:2]) == [0.0, 0.0] and found[2][2] > 0
    for gen, real, _ in found[:2]:
        assert np.array_equal(gen, real) and any(np.array_equal(gen, fake[i]) for i in (2, 5))
    # The third pair: the nearest training image of the remaining generated images, by a float64 computation.
    feats = lambda x: torch.from_numpy(detector.features(torch.from_numpy(x), 'cpu')).double()
    train = np.concatenate([others[:3], fake[[5]], others[3:], fake[[2]]])
    distances = torch.cdist(feats(fake), feats(train))
    rest = [i for i in range(8) if i not in (2, 5)]
    best = min(rest, key=lambda i: float(distances[i].min()))
    assert np.array_equal(found[2][0], fake[best]) and np.array_equal(found[2][1], train[int(distances[best].argmin())])
    assert found[2][2] == pytest.approx(float(distances[best].min()), rel=1e-9)
    record = dict(taxon='Calanoida', pkl='net.pkl', data=data, detector=str(tmp_path / 'det.pt'))
    written = report.write_closest_pairs(tmp_path, {'Calanoida': [('direct', record)]}, num=8, pairs=3)
    assert [p.split('/')[-1] for p in written] == ['closest-Calanoida.png']
    grid = Image.open(written[0])
    # One row of 3 pairs (6 cells of 64 px and 2 px gaps) after its label, the first pair an exact copy side by side.
    label_w = grid.size[0] - 6 * 66 - 2
    assert grid.size[1] == 24 + 66 + 2 and label_w > 0
    cells = [np.asarray(grid.convert('RGB').crop((label_w + 2 + c * 66, 26, label_w + 2 + c * 66 + 64, 90))) for c in range(2)]
    assert np.array_equal(cells[0], cells[1]) and np.array_equal(cells[0], np.asarray(report._to_rgb_image(found[0][0], 64)))

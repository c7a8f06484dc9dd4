"""Commands that serve tasks: `predict` over images, `export` for deployment."""
from __future__ import annotations

import click
from rich.table import Table

import subcache
from subcache.multitask import predict as predict_tasks
from subcache.progress import stage

from .common import allows_factories, console, device_option, emit_json, friendly, option


# -- predict ---------------------------------------------------------------------------------------------------
@click.command()
@click.option("--task", "tasks", multiple=True, required=True, help="task directory; repeat for several tasks")
@click.option("--data", required=True, help="a dataset spec (split --split), an unlabelled folder, or one image file")
@click.option("--split", help="the data's split [default: test; train for a folder of class folders, its one split]")
@click.option("--limit", type=click.IntRange(min=1), help="first N images")
@option("--batch-size", type=click.IntRange(min=1), of=predict_tasks)
@click.option("--workers", type=click.IntRange(min=0), help="processes decoding photos [default: the cores, at most "
              "8, on CUDA; 0 on the CPU]; 0: threads of the main process")
@device_option
@click.option("--out", help="write per-item predictions (CSV: id, key, label, then per task its class and _prob)")
@click.option("--show", type=click.IntRange(min=0), default=20, show_default=True, help="items to print")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True,
              help="the K most probable classes per item, with probabilities")
@click.option("--json", "as_json", is_flag=True, help="one JSON object: accuracy and every item's predictions")
@allows_factories
@friendly
def predict(tasks, data, split, limit, batch_size, workers, device, out, show, top, overwrite, as_json) -> None:
    """Run several tasks over a dataset at once: shared prefix once, each task forks at its first tuned block.
    Every item is named by its source key (its path under the folder given) and every class by its name."""
    if out:
        from subcache.task import check_output_file

        check_output_file(out, overwrite=overwrite)
    result = subcache.predict(tasks, data, split=split, limit=limit, batch_size=batch_size, device=device,
                              progress=True, workers=workers)
    if out:
        result.save(out)
    rows = result.rows(top)
    for reason in result.no_accuracy.values():
        click.echo(reason, err=True)
    if as_json:
        emit_json({"items": len(result.ids), "accuracy": result.accuracy, "tasks": list(result.preds),
                   "images_per_second": round(result.images_per_second, 1), "out": out, "predictions": rows})
        return
    table = Table(title=f"predictions on {data} ({result.split}, {len(result.ids)} images)")
    for col in ("key", "label", *result.preds):
        table.add_column(col)
    for row in rows[:show]:
        table.add_row(row["key"], row["label"], *(predicted(row, n, top) for n in result.preds))
    console.print(table)
    for name, acc in result.accuracy.items():
        console.print(f"{name}: accuracy {acc:.4f}")


def predicted(row: dict, name: str, top: int) -> str:
    """``Sneaker (0.65)``, or with --top K: ``Sneaker 0.65, Sandal 0.20, Ankle boot 0.10``."""
    if top == 1:
        return f"{row[name]} ({row[name + '_prob']:.2f})"
    return ", ".join(f"{c} {p:.2f}" for c, p in row[f"{name}_top"])


# -- export ----------------------------------------------------------------------------------------------------
@click.command()
@click.option("--task", "tasks", multiple=True, required=True, help="task directory; repeat for several tasks")
@click.option("--format", "fmt", type=click.Choice(["onnx", "pt2", "torchscript", "timm"]), required=True,
              help="onnx | pt2 | torchscript: the multi-task model; timm: one task as the plain model's state dict")
@click.option("--out", required=True, help="output file (.onnx, .pt2, .pt; .safetensors or .pth for timm)")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--preprocess", is_flag=True,
              help="onnx | pt2 | torchscript: the model takes uint8 RGB images and scales and normalises them")
@click.option("--json", "as_json", is_flag=True, help="print the metadata written with the model")
@allows_factories
@friendly
def export(tasks, fmt, out, preprocess, overwrite, as_json) -> None:
    """Export tasks for deployment: one model, dynamic batch, preprocessing recorded in the file's metadata."""
    from subcache.export import export as export_tasks

    with stage(f"export {fmt} to {out}"):
        meta = export_tasks(tasks, fmt, out, preprocess=preprocess, overwrite=overwrite)
    if as_json:
        emit_json(meta)
    elif fmt == "timm":
        console.print(f"{out}: load it into {meta['model']} built with num_classes={meta['num_classes']} "
                      f"(strict=True)")
    else:
        console.print(f"{out}: input images (batch, 3, {meta['input']['shape'][-1]}, {meta['input']['shape'][-1]}) "
                      f"{meta['input']['dtype']}: {meta['input']['how']}; outputs {', '.join(meta['outputs'])}")

using System.CommandLine;
using Mamo.Model;
using Mamo.Model.Published;
using Mamo.Data;
using Mamo.Data.Datasets;
using System.Text.Json;

namespace Mamo.Cli.Commands;

/// <summary>`mamo export --format hf-bert|timm-vit|onnx CHECKPOINT OUT` (docs/IMPORT.md; ONNX: docs/SERVING.md).</summary>
public static class ExportCommand
{
    public static Command Create()
    {
        var format = new Option<string>("--format")
        {
            Description = "hf-bert (text encoder and fusion layers), timm-vit (image encoder) or onnx (both encoders with their projections: the run's embeddings)",
            Required = true,
        };
        format.AcceptOnlyFromAmong(WeightSource.HfBert, WeightSource.TimmVit, WeightSource.Onnx);
        var weights = new Option<string>("--weights") { Description = "teacher (the EMA weights evaluation uses, the default where saved) or student" };
        weights.AcceptOnlyFromAmong(Checkpoint.TeacherPart, Checkpoint.StudentPart);
        var checkpoint = new Argument<string>("checkpoint") { Description = "A checkpoint folder, or a run folder (its newest checkpoint)" };
        var output = new Argument<string>("out") { Description = "The folder to write into: model.safetensors and config.json, or for onnx the two graphs, preprocessing.json and vocab.txt" };
        var command = new Command("export", "Write a checkpoint's encoder in a published layout (Hugging Face BERT, timm ViT) or both encoders as ONNX")
        {
            format, weights, checkpoint, output,
        };
        command.SetAction(parse =>
        {
            var error = parse.InvocationConfiguration.Error;
            var dir = Checkpoint.Latest(parse.GetValue(checkpoint)!);
            if (dir is null)
            {
                error.WriteLine($"mamo export: no checkpoint at {parse.GetValue(checkpoint)}");
                return ExitCodes.Usage;
            }
            try
            {
                var parts = Checkpoint.Parts(Checkpoint.ReadState(dir));
                var part = parse.GetValue(weights) ?? Checkpoint.InferencePart(dir);
                if (!parts.Contains(part)) throw new InvalidDataException($"{dir} holds no {part} weights");
                var (to, kind) = (parse.GetValue(output)!, parse.GetValue(format)!);
                var done = WeightExport.Run(dir, Checkpoint.PartFile(part), kind, to);
                if (kind == WeightSource.Onnx) WritePreprocessing(dir, to, error);
                parse.InvocationConfiguration.Output.WriteLine(done);
                return 0;
            }
            catch (Exception e) when (e is ArgumentException or IOException or InvalidDataException or UnauthorizedAccessException or System.Text.Json.JsonException
                                          or DatasetFetchException or NpmMissingException)
            {
                error.WriteLine($"mamo export: {e.Message}");
                return ExitCodes.Failed;
            }
        });
        return command;
    }

    /// <summary>What a caller of the ONNX graphs must do to their inputs to get the run's embeddings: the image
    /// transform of evaluation and the tokenizer (its vocabulary beside), as `mamo embed` prepares them.</summary>
    static void WritePreprocessing(string checkpoint, string output, TextWriter log)
    {
        var config = Checkpoint.ReadConfig(checkpoint);
        var transform = new ImageTransformOptions(ImageSize: config.ImageSize);
        File.Copy(BuiltinDatasets.EnsureVocab(log: log.WriteLine), Path.Combine(output, "vocab.txt"), overwrite: true);
        var tokenizer = new TextTokenizer(Path.Combine(output, "vocab.txt"));
        Checkpoint.WriteDurably(Path.Combine(output, "preprocessing.json"), JsonSerializer.Serialize(new
        {
            version = $"step-{Checkpoint.ReadState(checkpoint).Step}",
            embedding_dim = config.EmbedDim,
            image = new
            {
                graph = OnnxExport.ImageFile, input = OnnxExport.Pixels, output = OnnxExport.Embedding, size = config.ImageSize,
                steps = "decode to RGB; resize the shorter side to size and centre-crop size x size (one bilinear resampling, mipmapped where it shrinks); scale to [0, 1]; " +
                        "subtract mean and divide by std per channel; layout [batch, 3, size, size]",
                mean = transform.ChannelMean, std = transform.ChannelStd,
            },
            text = new
            {
                graph = OnnxExport.TextFile, inputs = new[] { OnnxExport.InputIds, OnnxExport.AttentionMask }, output = OnnxExport.Embedding,
                vocab = "vocab.txt", lower_case = true, max_length = config.MaxTextLength,
                steps = "BERT WordPiece (uncased) over vocab.txt; [CLS] tokens [SEP], cut to max_length, padded with [PAD]; attention_mask 1 on tokens, 0 on padding",
                cls_id = tokenizer.ClsId, sep_id = tokenizer.SepId, pad_id = tokenizer.PadId,
            },
        }, new JsonSerializerOptions { WriteIndented = true }));
    }
}

